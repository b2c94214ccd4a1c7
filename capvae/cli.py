r"""The ``capvae`` command: one entry point for everything a run needs.

  capvae train --config configs/default.py --workdir runs/default [--config.gamma=500]
  capvae evaluate --workdir runs/default            # WORKDIR/eval.json
  capvae report --workdir runs/default              # WORKDIR/report/index.html
  capvae extract --workdir runs/capacity_sweep --member 3 --out runs/member3
  capvae compare runs/ --out runs/compare           # results.csv, results.html
  capvae SUBCOMMAND --help                          # that subcommand's flags

``train``, ``evaluate`` and ``report`` are :mod:`capvae.main`'s modes
(``python -m capvae.main --mode=...`` keeps working), ``extract`` is
:mod:`capvae.extract` and ``compare`` :mod:`capvae.compare`. Each subcommand
imports only its own module, so absl's flags of one never meet another's.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import textwrap

PROG = 'capvae'

# name: (module, one line, usage, flags shown by --help)
SUBCOMMANDS = {
    'train': ('capvae.main', 'train (or resume) a config\'s members in a workdir',
              '--config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]',
              ('config', 'workdir', 'coordinator_address', 'num_processes', 'process_id')),
    'evaluate': ('capvae.main', 'score every member of a workdir into WORKDIR/eval.json',
                 '--workdir=DIR [--eval_scale=S] [--eval_sizes=KEY=N,...]'
                 ' [--dci_estimator=fast|gbt]',
                 ('workdir', 'eval_scale', 'eval_sizes', 'dci_estimator', 'eval_seed')),
    'report': ('capvae.main', 'figures and WORKDIR/report/index.html (evaluating first if'
               ' eval.json is missing, stale or made with other settings than those given)', '--workdir=DIR [--eval_scale=S] [--eval_sizes=KEY=N,...]',
               ('workdir', 'eval_scale', 'eval_sizes', 'dci_estimator', 'eval_seed')),
    'extract': ('capvae.extract', 'pull one member of a sweep out as a stand-alone run',
                '--workdir=DIR --member=N --out=DIR [--step=STEP]',
                ('workdir', 'member', 'out', 'step')),
    'compare': ('capvae.compare', 'one table of every member of many workdirs (CSV,'
                ' HTML, text)', 'RUN_OR_GLOB [RUN_OR_GLOB ...] [--out=DIR]', ()),
}

_TRAIN_NOTE = ('  --config.FIELD=VALUE: override any field of the config file;'
               ' configs/default.py documents every field (e.g. --config.gamma=500,'
               ' --config.trackers=tensorboard,wandb).')


def overview() -> str:
  width = max(map(len, SUBCOMMANDS))
  lines = [f'usage: {PROG} SUBCOMMAND [flags]', '',
           'beta-VAEs and capacity-annealed beta-VAEs in JAX/Flax.', '', 'subcommands:']
  lines += [f'  {name.ljust(width)}  {desc}' for name, (_, desc, _, _) in SUBCOMMANDS.items()]
  lines += ['', f'{PROG} SUBCOMMAND --help shows its flags. Start with:',
            f'  {PROG} train --config configs/default.py --workdir runs/default']
  return '\n'.join(lines)


def _absl_help(sub: str) -> str:
  """``sub``'s usage and its flags' help, from the absl flags its module defines."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  module, desc, usage, names = SUBCOMMANDS[sub]
  importlib.import_module(module)
  lines = [f'usage: {PROG} {sub} {usage}', '', desc[0].upper() + desc[1:] + '.', '', 'flags:']
  for name in names:
    flag = flags.FLAGS[name]
    default = '' if flag.default in (None, '') else f' (default: {flag.default!r})'
    text = ' '.join(flag.help.split()) + default
    lines.append(f'  --{name}')
    lines += textwrap.wrap(text, 76, initial_indent='      ', subsequent_indent='      ')
  if sub == 'train':
    lines += [''] + textwrap.wrap(_TRAIN_NOTE.strip(), 78, initial_indent='  ',
                                  subsequent_indent='      ')
  lines += ['', f'{PROG} {sub} --helpfull lists every flag, JAX\'s included.']
  return '\n'.join(lines)


def _absl_parser(sub: str):
  """absl's flag parsing, with a bad flag reported as one line (exit 2)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f'{PROG} {sub}: error: {e}. See {PROG} {sub} --help.', file=sys.stderr)
      sys.exit(2)
  return parse


def _run_absl(sub: str, args: list[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  module_name = SUBCOMMANDS[sub][0]
  if any(a.lstrip('-') == 'mode' or a.lstrip('-').startswith('mode=') for a in args):
    print(f'{PROG} {sub}: error: --mode is the subcommand itself; drop it.', file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(module_name)
  argv = [f'{PROG} {sub}'] + ([f'--mode={sub}'] if module_name == 'capvae.main' else []) + args
  parser = getattr(module, 'parse_flags', None) or _absl_parser(sub)
  app.run(module.main, argv=argv, flags_parser=parser)


def compare_parser() -> argparse.ArgumentParser:
  _, desc, _, _ = SUBCOMMANDS['compare']
  p = argparse.ArgumentParser(
      prog=f'{PROG} compare', description=desc[0].upper() + desc[1:] + '.',
      epilog='In Python: capvae.load_results(paths) gives the same table as a pandas'
             ' DataFrame.')
  p.add_argument('paths', nargs='+', metavar='RUN_OR_GLOB',
                 help='a workdir, a glob of workdirs (quote it), or a folder searched for'
                      ' workdirs beneath it, e.g. runs/')
  p.add_argument('--out', default='compare',
                 help='folder for results.csv and results.html (default: %(default)s)')
  p.add_argument('--rows', type=int, default=20,
                 help='rows of the text table printed (default: %(default)s)')
  return p


def _compare(args: list[str]) -> int:
  ns = compare_parser().parse_args(args)
  from capvae import compare  # pylint: disable=g-import-not-at-top
  from capvae.errors import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    df = compare.load_results(ns.paths)
  except ConfigError as e:
    print(f'{PROG} compare: error: {e}', file=sys.stderr)
    return 2
  import os  # pylint: disable=g-import-not-at-top
  os.makedirs(ns.out, exist_ok=True)
  csv = compare.write_csv(df, os.path.join(ns.out, 'results.csv'))
  page = compare.write_html(df, os.path.join(ns.out, 'results.html'))
  print(compare.text_table(df, ns.rows))
  print(f'\nwrote {csv} and {page} ({len(df)} member(s) of {df["run"].nunique()} run(s)).')
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(overview(), file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  sub, rest = argv[0], argv[1:]
  if sub in ('--version', 'version'):
    from capvae import __version__  # pylint: disable=g-import-not-at-top
    print(f'{PROG} {__version__}')
    return 0
  if sub not in SUBCOMMANDS:
    near = difflib.get_close_matches(sub, SUBCOMMANDS, n=1)
    print(f'{PROG}: error: unknown subcommand {sub!r}'
          + (f'; did you mean {near[0]!r}?' if near else '')
          + f' Subcommands: {", ".join(SUBCOMMANDS)}.', file=sys.stderr)
    return 2
  if sub == 'compare':
    return _compare(rest)
  if any(a in ('-h', '--help', '--helpshort') for a in rest):
    print(_absl_help(sub))
    return 0
  _run_absl(sub, rest)
  return 0


if __name__ == '__main__':
  sys.exit(main())
