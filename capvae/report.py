r"""Figures and one offline HTML page about a trained run.

  capvae report --workdir runs/default

writes ``report/`` in the workdir (evaluating first when ``eval.json`` is
missing or older than the latest checkpoint):

* ``kl_latents_mNNN.png``: per-latent KL over training with C(t) drawn over it
  (Burgess et al. 2018, Fig. 3), latents ordered by final KL;
* ``kl_minus_c.png``: KL − C over training, steps where the gap exceeded
  1 nat marked (raise gamma until KL stays within about a nat of C);
* ``traversals_mNNN.png``: rows = latents sorted by held-out KL, columns =
  values of that latent from −2.5 to 2.5 with the others at a reference
  image's means;
* ``reconstructions_mNNN.png``: inputs beside their reconstructions;
* ``objective_terms.png``: the objective's own terms over training (the
  total correlation and its neighbours, the discriminator's accuracy, DIP's
  covariance terms, the controller's beta(t)), one line per member;
* for sweeps, ``sweep_metrics.png``: each metric against the swept
  hyperparameters (a heatmap for two axes, lines with the seed spread for one);
* ``index.html``: all of it, images embedded, readable offline.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import os
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from capvae import evaluate, losses, models, progress  # noqa: E402
from capvae import train_state as ts  # noqa: E402
from capvae import workdir as workdir_lib  # noqa: E402
from capvae.errors import ConfigError  # noqa: E402

REPORT_DIR = 'report'
GAP_NATS = 1.0  # the KL-follows-C tolerance marked in the diagnostic
TRAVERSAL_VALUES = models.TRAVERSAL_VALUES
# Metrics drawn against the swept hyperparameters (keys of eval.json's metrics).
SWEEP_METRICS = tuple(evaluate.HEADLINE)
SWEEP_AXES = tuple(h for h in ts.HPARAM_NAMES if h != 'seed')


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  if not os.path.exists(path):
    raise ConfigError(f'{path} does not exist: train the run in {workdir} first.')
  return workdir_lib.read_metrics(path)


def _member_rows(rows, member: int):
  return sorted((r for r in rows if r['member'] == member), key=lambda r: r['step'])


def _num(v) -> float:
  return float('nan') if v is None else float(v)


def _label(rec: dict[str, Any], varying: Sequence[str]) -> str:
  parts = [f'{k}={rec[k]:g}' for k in varying if k in rec]
  return f'member {rec["member"]}' + (f' ({", ".join(parts)})' if parts else '')


def gap_steps(rows) -> list[int]:
  """Logged steps where C > 0 and |KL − C| exceeded ``GAP_NATS``."""
  return [r['step'] for r in rows if r.get('c') and r.get('kl_minus_c') is not None
          and abs(r['kl_minus_c']) > GAP_NATS]


def varying_hparams(records) -> list[str]:
  return [h for h in ts.HPARAM_NAMES if len({r.get(h) for r in records}) > 1]


# --------------------------------------------------------------------------
# Figures (each returns a matplotlib figure).
# --------------------------------------------------------------------------


def fig_kl_latents(rows, title: str, factor_of: dict[int, str] | None = None):
  """Per-latent KL and total KL over training, with C(t) dashed.

  ``factor_of`` maps latents to the factor each encodes (``eval.json``'s
  ``latent_factors``); the legend names them.
  """
  factor_of = factor_of or {}
  steps = np.array([r['step'] for r in rows])
  kl = np.array([[_num(v) for v in r['kl_per_latent']] for r in rows])
  order = np.argsort(-np.nan_to_num(kl[-1], nan=-1.0))
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  cmap = plt.get_cmap('tab10' if kl.shape[1] <= 10 else 'tab20')
  for rank, j in enumerate(order):
    ax.plot(steps, kl[:, j], color=cmap(rank % cmap.N), lw=1.3,
            label=f'z{j}: {kl[-1, j]:.2f}' + (f' {factor_of[j]}' if j in factor_of else ''))
  ax.plot(steps, np.nansum(kl, axis=1), color='0.35', lw=2.2, label='total KL')
  if all(r.get('c') is not None for r in rows) and any(r.get('c') for r in rows):
    ax.plot(steps, [r['c'] for r in rows], 'k--', lw=1.6, label='C(t)')
  ax.set_xlabel('training step')
  ax.set_ylabel('KL (nats, batch mean)')
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, ncol=2, loc='upper left', title='final KL, ordered',
            title_fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def fig_kl_minus_c(rows_by_member, labels):
  """KL − C per member; steps with |KL − C| > 1 nat marked."""
  n = len(rows_by_member)
  cols = min(n, 3)
  nrows = math.ceil(n / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.0 * nrows), squeeze=False,
                           sharex=True)
  for ax, rows, label in zip(axes.flat, rows_by_member, labels):
    steps = np.array([r['step'] for r in rows])
    gap = np.array([_num(r.get('kl_minus_c')) for r in rows])
    ax.axhspan(-GAP_NATS, GAP_NATS, color='tab:green', alpha=0.12, lw=0)
    ax.axhline(0, color='k', lw=0.8)
    ax.plot(steps, gap, color='tab:blue', lw=1.2)
    c = np.array([_num(r.get('c')) for r in rows])
    bad = (np.abs(gap) > GAP_NATS) & (c > 0)
    ax.plot(steps[bad], gap[bad], 'o', color='tab:red', ms=3.5,
            label=f'|KL − C| > {GAP_NATS:g} nat: {int(bad.sum())} of {len(steps)} logs')
    ax.set_title(label, fontsize=8)
    ax.set_ylabel('KL − C (nats)', fontsize=8)
    ax.legend(fontsize=7, loc='best')
    ax.grid(alpha=0.3)
  for ax in axes.flat[n:]:
    ax.axis('off')
  for ax in axes[-1]:
    ax.set_xlabel('training step')
  fig.tight_layout()
  return fig


def _image_grid(images: np.ndarray) -> np.ndarray:
  """``[R, C, H, W, ch]`` → one ``[R·(H+1), C·(W+1), ch]`` image with 1-px gaps."""
  r, c, h, w, ch = images.shape
  out = np.ones((r * (h + 1) - 1, c * (w + 1) - 1, ch), np.float32)
  for i in range(r):
    for j in range(c):
      out[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = images[i, j]
  return out


def _show(ax, img):
  if img.shape[-1] == 1:
    ax.imshow(img[..., 0], cmap='gray', vmin=0, vmax=1, interpolation='nearest')
  else:
    ax.imshow(np.clip(img, 0, 1), interpolation='nearest')


def fig_traversals(images, latents, kls, title: str):
  """``images`` ``[L, V, H, W, ch]``; rows labelled with latent index and KL."""
  grid = _image_grid(images)
  h = images.shape[2] + 1
  fig, ax = plt.subplots(figsize=(0.62 * images.shape[1] + 1.4, 0.62 * images.shape[0] + 0.9))
  _show(ax, grid)
  ax.set_yticks([h * i + h / 2 - 1 for i in range(len(latents))])
  ax.set_yticklabels([f'z{j} ({k:.2f})' for j, k in zip(latents, kls)], fontsize=7)
  w = images.shape[3] + 1
  ax.set_xticks([w * i + w / 2 - 1 for i in range(images.shape[1])])
  ax.set_xticklabels([f'{v:g}' for v in TRAVERSAL_VALUES], fontsize=7)
  ax.set_xlabel('latent value (others at a reference image\'s means)', fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def fig_reconstructions(inputs, recons, title: str):
  grid = _image_grid(np.stack([inputs, recons]))
  fig, ax = plt.subplots(figsize=(0.75 * inputs.shape[0] + 1.2, 2.3))
  _show(ax, grid)
  h = inputs.shape[1] + 1
  ax.set_yticks([h / 2 - 1, h + h / 2 - 1])
  ax.set_yticklabels(['input', 'reconstruction'], fontsize=8)
  ax.set_xticks([])
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def fig_sweep_metrics(records, names: Sequence[str]):
  """Each metric against the swept hyperparameters (seeds pooled)."""
  axes_names = [h for h in varying_hparams(records) if h in SWEEP_AXES]
  if not axes_names:
    axes_names = ['member']
  names = [n for n in names if all(n in r['metrics'] for r in records)]
  cols = min(len(names), 3)
  nrows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    if len(axes_names) == 2:
      a, b = axes_names
      va, vb = sorted({r[a] for r in records}), sorted({r[b] for r in records})
      grid = np.full((len(va), len(vb)), np.nan)
      for i, x in enumerate(va):
        for j, y in enumerate(vb):
          vals = [_num(r['metrics'][name]) for r in records if r[a] == x and r[b] == y]
          if vals:
            grid[i, j] = np.nanmean(vals)
      im = ax.imshow(grid, cmap='viridis', aspect='auto', origin='lower')
      for i in range(len(va)):
        for j in range(len(vb)):
          ax.text(j, i, f'{grid[i, j]:.2f}', ha='center', va='center', fontsize=8,
                  color='w' if grid[i, j] < np.nanmean(grid) else 'k')
      ax.set_xticks(range(len(vb)), [f'{v:g}' for v in vb], fontsize=7)
      ax.set_yticks(range(len(va)), [f'{v:g}' for v in va], fontsize=7)
      ax.set_xlabel(b, fontsize=8)
      ax.set_ylabel(a, fontsize=8)
      fig.colorbar(im, ax=ax, fraction=0.046)
    else:
      for a in axes_names:
        key = (lambda r, a=a: r[a]) if a != 'member' else (lambda r: r['member'])
        xs = sorted({key(r) for r in records})
        mean, lo, hi = [], [], []
        for x in xs:
          vals = np.array([_num(r['metrics'][name]) for r in records if key(r) == x])
          mean.append(np.nanmean(vals)), lo.append(np.nanmin(vals)), hi.append(np.nanmax(vals))
          ax.plot([x] * len(vals), vals, '.', color='0.5', ms=4)
        line, = ax.plot(xs, mean, 'o-', lw=1.5, label=f'{a} (mean over seeds)')
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        if a not in ('member', 'seed') and min(xs) > 0 and max(xs) / min(xs) >= 20:
          ax.set_xscale('log')
      ax.set_xlabel(', '.join(axes_names), fontsize=8)
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3)
    ax.set_title(name, fontsize=9)
  for ax in axes.flat[len(names):]:
    ax.axis('off')
  fig.tight_layout()
  return fig


# --------------------------------------------------------------------------
# Images from the model.
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('model', 'reconstruction'))
def _decoded(params, x, order, *, model, reconstruction):
  return models.decoded_images(model, params, x, order, reconstruction)


def model_images(run: workdir_lib.Members, member: int, order, seed: int = 0,
                 num_recons: int = 8):
  """``(traversals [L, V, ...], inputs [n, ...], reconstructions [n, ...])`` of one member."""
  params = jax.tree.map(lambda a: a[member], run.states.params)
  key = jax.random.fold_in(jax.random.key(seed), 2)
  x = evaluate.draw_images(run.dataset, key, num_recons, seed)
  pics, recon = _decoded(params, x, jnp.asarray(order, jnp.int32), model=run.model,
                         reconstruction=run.config.reconstruction)
  pics = np.asarray(pics).reshape(len(order), len(TRAVERSAL_VALUES), *pics.shape[1:])
  return pics, np.asarray(x), np.asarray(recon)


# --------------------------------------------------------------------------
# The page.
# --------------------------------------------------------------------------


def _png(fig, path: str) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  plt.close(fig)
  data = buf.getvalue()
  with open(path, 'wb') as f:
    f.write(data)
  return data


def _img(data: bytes, alt: str) -> str:
  return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,'
          f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(alt)}'
          '</figcaption></figure>')


def _fmt(v) -> str:
  if isinstance(v, float) and v.is_integer() and abs(v) < 1e6:
    return str(int(v))
  if isinstance(v, float):
    return f'{v:.3g}' if abs(v) < 1e4 else f'{v:.4g}'
  return html.escape(str(v))


def _table(header, body) -> str:
  head = ''.join(f'<th>{html.escape(h)}</th>' for h in header)
  rows = ''.join('<tr>' + ''.join(f'<td>{_fmt(c)}</td>' for c in row) + '</tr>'
                 for row in body)
  return (f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>'
          '</table></div>')


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;color:#1b1b1b;line-height:1.4;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ccc}
h3{font-size:1.02em}table{border-collapse:collapse;font-size:.82em;margin:.6em 0}
.wide{overflow-x:auto}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
figure{display:inline-block;margin:6px 10px 12px 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.8em;color:#555}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 3px}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images-loaded', ok.length + '/' + imgs.length);
  document.getElementById('loaded').textContent = ok.length + ' of ' + imgs.length +
      ' figures loaded.';
});
"""


def fig_objective_terms(rows_by_member, labels, terms: Sequence[str]):
  """Each of the objective's ``terms`` over training, one line per member."""
  fig, axes = plt.subplots(1, len(terms), figsize=(4.6 * len(terms), 3.2), squeeze=False)
  for ax, term in zip(axes[0], terms):
    for rows, label in zip(rows_by_member, labels):
      ax.plot([r['step'] for r in rows], [_num(r.get(term)) for r in rows], lw=1.1,
              label=label)
    if term == 'beta_t':
      ax.set_yscale('symlog', linthresh=1.0)
    ax.set_title(TERM_TITLES.get(term, term), fontsize=9)
    ax.set_xlabel('training step')
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7, loc='best')
  fig.tight_layout()
  return fig


TERM_TITLES = {
    'tc': 'total correlation (batch estimate, nats)',
    'mi': 'index-code MI (nats)', 'dwkl': 'dimension-wise KL (nats)',
    'disc_accuracy': 'discriminator accuracy (0.5: chance)',
    'disc_loss': 'discriminator loss', 'dip': 'DIP penalty',
    'cov_offdiag': 'Σ off-diagonal Cov²', 'cov_diag_err': 'Σ (diag Cov − 1)²',
    'beta_t': 'controller beta(t)', 'kl_minus_c': 'KL − C (nats)',
    'controller_integral': 'controller integral',
}


def _why_evaluate(result, run, wanted: dict[str, Any]) -> str | None:
  """Why ``result`` (``eval.json`` or None) cannot serve the report of ``run``
  asked for with settings ``wanted``; None if it can."""
  if result is None:
    return f'no {evaluate.EVAL_FILE} yet'
  if result.get('step') != run.step or len(result['members']) != run.num_members:
    return (f'{evaluate.EVAL_FILE} is of step {result.get("step")} with'
            f' {len(result["members"])} member(s), the run is at step {run.step} with'
            f' {run.num_members}')
  made = result.get('settings', {})
  differ = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
  if differ:
    return f'{evaluate.EVAL_FILE} was made with ' + ', '.join(
        f'{k}={old!r}, not {new!r}' for k, (old, new) in differ.items())
  return None


def write_report(workdir: str, *, eval_scale: float | None = None,
                 dci_estimator: str | None = None, seed: int | None = None,
                 sizes: dict[str, int] | None = None) -> str:
  """Writes ``report/`` (figures and ``index.html``) for ``workdir``; returns the page path.

  ``eval.json`` is reused when it holds every member at the latest checkpoint
  and was made with every setting given here (``None``, or a size not given:
  whatever it was made with). Otherwise :func:`capvae.evaluate.evaluate` runs
  first, with the settings given and the defaults for the others (scale 1,
  DCI ``'fast'``, seed 0).
  """
  given = {k: v for k, v in {'scale': eval_scale, 'dci_estimator': dci_estimator,
                              'seed': seed}.items() if v is not None}
  settings = {'scale': 1.0, 'dci_estimator': 'fast', 'seed': 0, **given}
  evaluate.check_settings(settings['scale'], settings['dci_estimator'], settings['seed'])
  evaluate.check_sizes(sizes, settings['scale'])
  rows = read_metrics(workdir)
  run = workdir_lib.Members(workdir)
  result = evaluate.load(workdir)
  wanted = {**given, **(sizes or {})}
  if evaluate.INFO_IMAGES_KEY in wanted:  # as evaluate records it: at most the grid
    wanted[evaluate.INFO_IMAGES_KEY] = min(wanted[evaluate.INFO_IMAGES_KEY],
                                           run.dataset.num_examples)
    if result is not None and not result.get('has_factors', True):
      del wanted[evaluate.INFO_IMAGES_KEY]  # no grid, no I(x; z): nothing to compare
  why = _why_evaluate(result, run, wanted)
  if why:
    logging.info('Evaluating first: %s.', why)
    result = evaluate.evaluate(workdir, scale=settings['scale'],
                               dci_estimator=settings['dci_estimator'], seed=settings['seed'],
                               sizes=sizes)
  image_seed = result.get('settings', {}).get('seed', settings['seed'])  # the evaluation's
  records = result['members']
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  config = run.config
  varying = varying_hparams(records)
  capacity = config.objective in ('capacity', 'controlled_capacity')
  terms = [t for t in losses.OBJECTIVE_TERMS[config.objective] if t != 'kl_minus_c']
  sweep_mode = len(records) > 1

  parts = [f'<h1>capvae report: {html.escape(os.path.basename(os.path.abspath(workdir)))}</h1>']
  parts.append(
      f'<p class="note">Workdir <code>{html.escape(os.path.abspath(workdir))}</code>,'
      f' checkpoint step {run.step}, {len(records)} member(s). Model'
      f' <code>{config.model}</code>, {config.latent_size} latents, dataset'
      f' <code>{config.dataset}</code>, objective <code>{config.objective}</code>'
      f' ({config.reconstruction} reconstruction'
      + (f', {config.schedule} capacity schedule, penalty {config.capacity_penalty}'
         if capacity else '') + '). Metrics at '
      f'{result["settings"]["scale"]:g}× disentanglement_lib sample sizes, DCI by'
      f' <code>{result["settings"]["dci_estimator"]}</code>, on encoder means.'
      ' <span id="loaded"></span></p>')

  # Members and metrics.
  metric_names = list(records[0]['metrics'])
  parts.append('<h2>Metrics</h2>')
  parts.append(_table(
      ['member', *varying, 'KL', 'I(x; z)', 'KL spread', 'KL offset', 'rec', 'active',
       *metric_names],
      [[r['member'], *[r[h] for h in varying], r['kl'], (r.get('information') or {}).get('mi'),
        r.get('kl_parts', {}).get('spread'), r.get('kl_parts', {}).get('offset'),
        r['rec'], r['active_latents'],
        *[r['metrics'][k] for k in metric_names]] for r in records]))
  parts.append('<p class="note">KL and rec: held-out means (nats per image) over '
               f'{result["settings"].get("num_heldout", "")} fresh draws; active: latents'
               f' with KL ≥ {evaluate.ACTIVE_KL:g} nats. I(x; z): the information the'
               ' code carries about the image (x uniform over the dataset; at most ln of its'
               ' size; <code>capvae.metrics.information</code>); the rest of the KL buys'
               ' nothing. KL spread: the part of the KL in'
               ' posterior means that move with the image, the only part that can carry'
               ' information; KL offset: means shifted by the same amount for every image,'
               ' which carries none (a collapsed encoder pays C with it;'
               ' <code>capvae.losses.kl_decomposition</code>).</p>')
  parts.append('<h2>What each active latent encodes</h2>')
  if not result.get('has_factors', True):
    parts.append(f'<p class="note">{html.escape(config.dataset)} has no ground-truth factor'
                 ' grid, so there are no disentanglement metrics or latent-to-factor'
                 ' assignments; traversals and reconstructions below still apply.</p>')
  parts.append(_table(
      ['member', 'latent', 'KL', 'factor (max MI)', 'MI / H(factor)'],
      [[r['member'], f'z{lf["latent"]}', lf['kl'], lf['factor'], lf['normalized_mi']]
       for r in records for lf in r['latent_factors']]))

  if sweep_mode and metric_names:
    parts.append('<h2>Metrics against the swept hyperparameters</h2>')
    data = _png(fig_sweep_metrics(records, SWEEP_METRICS),
                os.path.join(out_dir, 'sweep_metrics.png'))
    parts.append(_img(data, 'Each metric against the swept hyperparameters'
                      ' (heatmaps: mean over seeds; lines: mean, band: seed range).'))

  if capacity:
    parts.append('<h2>Did KL follow C?</h2>')
    by_member = [_member_rows(rows, r['member']) for r in records]
    data = _png(fig_kl_minus_c(by_member, [_label(r, varying) for r in records]),
                os.path.join(out_dir, 'kl_minus_c.png'))
    worst = []
    for r, mr in zip(records, by_member):
      over = gap_steps(mr)
      worst.append([r['member'], *[r[h] for h in varying], len(over), len(mr),
                    ', '.join(map(str, over[:8])) + (' …' if len(over) > 8 else '')])
    parts.append(_img(data, f'KL − C over training; red: logged steps where |KL − C| >'
                      f' {GAP_NATS:g} nat. If KL lags C, raise gamma (or, with the'
                      ' controller, its gains).'))
    parts.append(_table(['member', *varying, f'logs with |KL−C|>{GAP_NATS:g}', 'logs',
                         'steps (C > 0)'], worst))

  if terms:
    parts.append(f'<h2>The objective\'s own terms ({html.escape(config.objective)})</h2>')
    by_member = [_member_rows(rows, r['member']) for r in records]
    data = _png(fig_objective_terms(by_member, [_label(r, varying) for r in records], terms),
                os.path.join(out_dir, 'objective_terms.png'))
    parts.append(_img(data, 'The objective\'s terms on each training batch.'))
    parts.append(_table(['member', *varying, *[f'held-out {t}' for t in terms]],
                        [[r['member'], *[r[h] for h in varying],
                          *[(r.get('objective_terms') or {}).get(t) for t in terms]]
                         for r in records]))
    parts.append('<p class="note">Held-out: the same terms on fresh batches of 500'
                 ' images at the last checkpoint (<code>objective_terms</code> in'
                 ' eval.json); the total correlation\'s estimate depends on the batch'
                 ' size.</p>')

  for r in progress.iterate(records, len(records), 'report figures', 'member'):
    m = r['member']
    mr = _member_rows(rows, m)
    label = _label(r, varying)
    parts.append(f'<h2>{html.escape(label)}</h2>')
    if r.get('frozen'):
      parts.append('<p><b>This member froze (diverged); its last finite parameters are'
                   ' shown.</b></p>')
    factor_of = {lf['latent']: lf['factor'] for lf in r['latent_factors']}
    data = _png(fig_kl_latents(mr, f'{label}: per-latent KL over training', factor_of),
                os.path.join(out_dir, f'kl_latents_m{m:03d}.png'))
    parts.append(_img(data, 'Per-latent KL (batch means) over training'
                      + (', C(t) dashed' if capacity else '') + '; legend ordered by final KL.'))
    order = list(np.argsort(-np.asarray(r['kl_per_latent'])))
    pics, inputs, recons = model_images(run, m, order, seed=image_seed)
    data = _png(fig_traversals(pics, order, [r['kl_per_latent'][j] for j in order],
                               f'{label}: traversals'),
                os.path.join(out_dir, f'traversals_m{m:03d}.png'))
    parts.append(_img(data, 'Latent traversals; rows: latents by held-out KL (nats).'))
    data = _png(fig_reconstructions(inputs, recons, f'{label}: reconstructions'),
                os.path.join(out_dir, f'reconstructions_m{m:03d}.png'))
    parts.append(_img(data, 'Held-out inputs and their reconstructions (from the means).'))

  page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
          f'<title>capvae report: {html.escape(os.path.basename(os.path.abspath(workdir)))}'
          f'</title><style>{_STYLE}</style></head><body>{"".join(parts)}'
          f'<script>{_SCRIPT}</script></body></html>')
  path = os.path.join(out_dir, 'index.html')
  with open(path, 'w') as f:
    f.write(page)
  return path
