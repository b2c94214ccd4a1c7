r"""Results across runs: one row per member of every workdir, as a table.

  capvae compare runs/beta_grid runs/capacity_sweep 'runs/higgins_*'
  capvae compare runs/ --out runs/compare     # every workdir under runs/

In Python, the same table as a pandas DataFrame:

  import capvae
  df = capvae.load_results(['runs/beta_grid', 'runs/capacity_sweep'])
  df.groupby('run')['mig'].max()

Each row is one member: its workdir (``run``, ``workdir``), the config's
kinds (``objective``, ``model``, ``dataset``, …), its hyperparameters (every
field of :class:`capvae.train_state.Hparams`), the last logged training
values from ``metrics.jsonl`` (``step``: the last logged step, as there,
N − 1 for a run of N steps; ``train_loss``, ``train_rec``,
``train_kl``, ``train_c``, ``train_kl_minus_c``, ``frozen``) and, when the
workdir has an ``eval.json``, every score in it (the headline metrics by
their names, ``mig``, ``dci_disentanglement``, …, every score by its dotted
name, ``factor_vae.eval_accuracy``, …) with the held-out values
(``eval_step``, ``eval_kl``, ``eval_rec``, ``active_latents``, ``mi``,
``kl_spread``, ``kl_offset``, ``eval_<term>`` of the objective's terms). A
workdir without ``eval.json`` has its training columns and NaN for the rest.

``capvae compare`` writes the table as ``results.csv`` and as
``results.html``: one self-contained page (no network) with the table,
sortable by any column, and plots of any score against any hyperparameter,
coloured by run; and prints a short text table.
"""

from __future__ import annotations

import glob
import html
import json
import math
import os
from typing import Any, Iterable, Sequence

from capvae import train_state as ts
from capvae import workdir as workdir_lib
from capvae.errors import ConfigError

EVAL_FILE = 'eval.json'  # capvae.evaluate.EVAL_FILE, without importing the metrics
CONFIG_COLUMNS = ('objective', 'model', 'dataset', 'latent_size', 'reconstruction',
                  'schedule', 'capacity_penalty', 'init', 'batch_size', 'num_steps')
TRAIN_COLUMNS = ('step', 'train_loss', 'train_rec', 'train_kl', 'train_c',
                 'train_kl_minus_c', 'frozen')
HELDOUT_COLUMNS = ('eval_step', 'eval_kl', 'eval_rec', 'active_latents', 'mi',
                   'kl_spread', 'kl_offset')
# Folders inside a workdir that never hold another workdir.
_NOT_RUNS = {'checkpoints', 'tb', 'report', 'wandb', 'mlruns'}


def _is_workdir(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, workdir_lib.CONFIG_FILE)) and
          os.path.isfile(os.path.join(path, workdir_lib.MEMBERS_FILE)))


def find_workdirs(paths: str | Iterable[str]) -> list[str]:
  """The workdirs ``paths`` name: each a workdir, a glob of them, or a folder
  searched for workdirs beneath it. Each is listed once, in the order given."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in map(os.fspath, paths):
    matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
    found = []
    for m in matches:
      if not os.path.isdir(m):
        continue
      if _is_workdir(m):
        found.append(m)
        continue
      for root, dirs, _ in os.walk(m):
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS)
        if _is_workdir(root):
          found.append(root)
          dirs[:] = []
    if not found:
      raise ConfigError(
          f'{p}: ' + ('no such file or directory' if not matches or not any(
              os.path.exists(m) for m in matches) else 'holds no capvae workdir')
          + ' (a workdir has config.json and members.json; train one with capvae train).')
    seen = {os.path.abspath(o) for o in out}
    for f in found:
      if os.path.abspath(f) not in seen:
        seen.add(os.path.abspath(f))
        out.append(os.path.normpath(f))
  return out


def _run_names(workdirs: Sequence[str]) -> list[str]:
  """Short unique names: the paths relative to their common folder."""
  absolute = [os.path.abspath(w) for w in workdirs]
  if len(absolute) == 1:
    return [os.path.basename(absolute[0])]
  common = os.path.commonpath(absolute)
  names = [os.path.relpath(a, common) for a in absolute]
  return [os.path.basename(a) if n == '.' else n for a, n in zip(absolute, names)]


def _finite(v):
  """A JSON value as a table cell: ``None`` (a value that was not finite) is NaN."""
  return math.nan if v is None else v


def _workdir_rows(workdir: str, run: str) -> list[dict[str, Any]]:
  config = workdir_lib.load_config(workdir)
  members = workdir_lib.load_members(workdir)
  last = {}
  metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  if os.path.exists(metrics_path):
    for r in workdir_lib.read_metrics(metrics_path):
      if r.get('member') is not None and r.get('step', -1) >= last.get(
          r['member'], {}).get('step', -1):
        last[r['member']] = r
  evaluated = {}
  eval_path = os.path.join(workdir, EVAL_FILE)
  settings = {}
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      result = json.load(f)
    settings = result.get('settings', {})
    evaluated = {r['member']: r for r in result.get('members', [])}
  rows = []
  for member in members:
    m = member['member']
    row = {'run': run, 'workdir': os.path.abspath(workdir), 'member': m}
    for k in CONFIG_COLUMNS:
      row[k] = config.get(k)
    for k in ts.HPARAM_NAMES:
      row[k] = member.get(k, ts.LATER_HPARAMS.get(k))
    rec = last.get(m)
    if rec is not None:
      row['step'] = rec['step']
      for k in ('loss', 'rec', 'kl', 'c', 'kl_minus_c'):
        row[f'train_{k}'] = _finite(rec.get(k))
      row['frozen'] = bool(rec.get('frozen', False))
    e = evaluated.get(m)
    if e is not None:
      row['eval_step'] = e.get('step', result.get('step'))
      row['eval_scale'] = settings.get('scale')
      row['eval_kl'] = _finite(e.get('kl'))
      row['eval_rec'] = _finite(e.get('rec'))
      row['active_latents'] = e.get('active_latents')
      row['mi'] = _finite((e.get('information') or {}).get('mi'))
      row['kl_spread'] = _finite((e.get('kl_parts') or {}).get('spread'))
      row['kl_offset'] = _finite((e.get('kl_parts') or {}).get('offset'))
      for k, v in (e.get('objective_terms') or {}).items():
        row[f'eval_{k}'] = _finite(v)
      for k, v in (e.get('metrics') or {}).items():
        row[k] = _finite(v)
      for k, v in (e.get('scores') or {}).items():
        row[k] = _finite(v)
    rows.append(row)
  return rows


def load_results(paths: str | Iterable[str]):
  """Every member of every workdir ``paths`` names, one row each, as a pandas
  DataFrame (see the module docstring for the columns)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  workdirs = find_workdirs(paths)
  rows = []
  for workdir, run in zip(workdirs, _run_names(workdirs)):
    rows.extend(_workdir_rows(workdir, run))
  columns = ['run', 'member', *CONFIG_COLUMNS, *ts.HPARAM_NAMES, *TRAIN_COLUMNS,
             *HELDOUT_COLUMNS]
  extra = []
  for r in rows:
    extra.extend(k for k in r if k not in columns and k not in extra)
  ordered = columns + [k for k in extra if k != 'workdir'] + ['workdir']
  df = pd.DataFrame(rows, columns=ordered)
  for c in ('member', 'latent_size', 'batch_size', 'num_steps', 'step', 'eval_step',
            'active_latents', 'seed', 'c_anneal_steps', 'c_stair_steps'):
    if c in df:  # integers, missing where a run has none (pandas' nullable ints)
      df[c] = df[c].astype('Int64')
  return df


def varying(df, names: Iterable[str]) -> list[str]:
  """Those of ``names`` whose values differ between rows."""
  return [n for n in names if n in df and df[n].nunique(dropna=False) > 1]


def score_columns(df) -> list[str]:
  """The numeric result columns (training values, held-out values, scores)."""
  fixed = {'run', 'workdir', 'member', *CONFIG_COLUMNS, *ts.HPARAM_NAMES, 'frozen', 'step',
           'eval_step', 'eval_scale'}
  return [c for c in df.columns if c not in fixed and _numeric(df[c])]


def _numeric(series) -> bool:
  import pandas as pd  # pylint: disable=g-import-not-at-top
  return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


# --------------------------------------------------------------------------
# Outputs.
# --------------------------------------------------------------------------


HEADLINE_SCORES = ('mig', 'dci_disentanglement', 'beta_vae', 'factor_vae', 'sap')


def text_table(df, max_rows: int = 20) -> str:
  """A short text table: run, member, the varying hyperparameters, the last
  training values and the headline scores present."""
  cols = ['run', 'member', *varying(df, ts.HPARAM_NAMES),
          *[c for c in ('train_kl', 'train_c', 'train_rec') if c in df],
          *[c for c in HEADLINE_SCORES if c in df and df[c].notna().any()]]
  shown = df[cols].head(max_rows)
  def fmt(v):
    if isinstance(v, float):
      return '–' if math.isnan(v) else f'{v:.4g}'
    return str(v)
  cells = [[fmt(v) for v in row] for row in shown.itertuples(index=False)]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
  lines = ['  '.join(c.rjust(w) for c, w in zip(cols, widths))]
  lines += ['  '.join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
  if len(df) > max_rows:
    lines.append(f'… {len(df) - max_rows} more row(s) in the CSV and HTML.')
  return '\n'.join(lines)


def write_csv(df, path: str) -> str:
  df.to_csv(path, index=False)
  return path


def _json_value(v):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if v is pd.NA or v is None or (isinstance(v, float) and not math.isfinite(v)):
    return None
  if hasattr(v, 'item'):
    return _json_value(v.item())
  return v


def write_html(df, path: str, title: str = 'capvae: results across runs') -> str:
  """The table and its plots as one self-contained HTML page (inline data,
  style and script; nothing fetched)."""
  hparams = [h for h in ts.HPARAM_NAMES if h in df]
  x_choices = varying(df, hparams)  # the grid: none when nothing varies
  scores = score_columns(df)
  # The headline scores present, and the last training KL (every member has it).
  defaults = [s for s in (*HEADLINE_SCORES, 'train_kl') if s in scores and df[s].notna().any()]
  data = {
      'columns': list(df.columns),
      'rows': [[_json_value(v) for v in row] for row in df.itertuples(index=False)],
      'runs': list(dict.fromkeys(df['run'])),
      'hparams': hparams,
      'x_choices': x_choices,
      'scores': scores,
      'default_plots': [[x, y] for y in defaults for x in x_choices],
  }
  page = _PAGE.replace('__TITLE__', html.escape(title)).replace(
      '__DATA__', json.dumps(data).replace('</', '<\\/')).replace(
          '__SUMMARY__', html.escape(
              f'{len(df)} member(s) of {df["run"].nunique()} run(s); '
              f'{int(df["eval_step"].notna().sum()) if "eval_step" in df else 0}'
              ' evaluated.'))
  with open(path, 'w') as f:
    f.write(page)
  return path


_PAGE = r'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer;position:sticky;top:0}
th.sorted-asc::after{content:" \25B2"} th.sorted-desc::after{content:" \25BC"}
td.text{text-align:left}
.scroll{max-height:32em;overflow:auto;border:1px solid #ddd}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.plot{border:1px solid #ddd;padding:4px}
.legend span{display:inline-block;margin-right:1em;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:4px}
select{margin-right:1em}
</style></head><body>
<h1>__TITLE__</h1>
<p>__SUMMARY__ Click a column to sort by it; choose any score against any
hyperparameter below. Colours are runs.</p>
<div class="legend" id="legend"></div>
<h2>Plot</h2>
<p>x <select id="x"></select> y <select id="y"></select> <label><input type="checkbox"
 id="logx"> log x</label></p>
<div id="chosen" class="plots"></div>
<h2>Each headline score against each varying hyperparameter</h2>
<div id="grid" class="plots"></div>
<h2>Table</h2>
<div class="scroll"><table id="table"><thead></thead><tbody></tbody></table></div>
<script>
const DATA = __DATA__;
const COLORS = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2',
                '#7f7f7f','#bcbd22','#17becf','#aec7e8','#ffbb78','#98df8a','#ff9896',
                '#c5b0d5','#c49c94','#f7b6d2','#c7c7c7','#dbdb8d','#9edae5'];
const col = name => DATA.columns.indexOf(name);
const color = run => COLORS[DATA.runs.indexOf(run) % COLORS.length];
const fmt = v => v === null || v === undefined ? '–' :
  (typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v));
const NS = 'http://www.w3.org/2000/svg';
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function plot(x, y, logx, parent) {
  const W = 300, H = 220, L = 60, B = 34, T = 20, R = 12;
  const xi = col(x), yi = col(y), ri = col('run');
  const pts = DATA.rows.filter(r => typeof r[xi] === 'number' && typeof r[yi] === 'number'
      && (!logx || r[xi] > 0)).map(r => [logx ? Math.log10(r[xi]) : r[xi], r[yi], r[ri], r]);
  const box = document.createElement('div'); box.className = 'plot';
  const svg = el('svg', {width: W, height: H, 'data-x': x, 'data-y': y,
                         'data-points': pts.length}, null);
  box.appendChild(svg); parent.appendChild(box);
  el('text', {x: W / 2, y: 14, 'text-anchor': 'middle', 'font-size': 12}, svg).textContent =
      `${y} against ${x}`;
  if (!pts.length) {
    el('text', {x: W / 2, y: H / 2, 'text-anchor': 'middle', 'font-size': 11}, svg)
        .textContent = 'no values';
    return svg;
  }
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; } if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = v => L + (v - x0) / (x1 - x0) * (W - L - R);
  const sy = v => H - B - (v - y0) / (y1 - y0) * (H - B - T);
  el('line', {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: '#888'}, svg);
  el('line', {x1: L, y1: T, x2: L, y2: H - B, stroke: '#888'}, svg);
  for (const [v, anchor] of [[x0, 'start'], [x1, 'end']])
    el('text', {x: sx(v), y: H - B + 13, 'text-anchor': anchor, 'font-size': 10}, svg)
        .textContent = fmt(logx ? Math.pow(10, v) : v);
  for (const v of [y0, y1])
    el('text', {x: L - 3, y: sy(v) + 3, 'text-anchor': 'end', 'font-size': 10}, svg)
        .textContent = fmt(v);
  el('text', {x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle', 'font-size': 11}, svg)
      .textContent = x + (logx ? ' (log)' : '');
  for (const [px, py, run, row] of pts) {
    const c = el('circle', {cx: sx(px), cy: sy(py), r: 4, fill: color(run),
                            'fill-opacity': 0.75, stroke: '#333', 'stroke-width': 0.5}, svg);
    el('title', {}, c).textContent = `${run} member ${row[col('member')]}: ${x} ${fmt(row[xi])}, ${y} ${fmt(row[yi])}`;
  }
  return svg;
}
function table() {
  const head = document.querySelector('#table thead'), body = document.querySelector('#table tbody');
  const tr = document.createElement('tr');
  DATA.columns.forEach((c, i) => {
    const th = document.createElement('th'); th.textContent = c; th.dataset.col = i;
    th.onclick = () => sortBy(i, th); tr.appendChild(th);
  });
  head.appendChild(tr);
  fill(DATA.rows);
  function fill(rows) {
    body.innerHTML = '';
    for (const r of rows) {
      const row = document.createElement('tr');
      r.forEach(v => { const td = document.createElement('td'); td.textContent = fmt(v);
        if (typeof v === 'string') td.className = 'text'; row.appendChild(td); });
      body.appendChild(row);
    }
  }
  let current = -1, asc = true;
  function sortBy(i, th) {
    asc = current === i ? !asc : true; current = i;
    document.querySelectorAll('#table th').forEach(h => h.className = '');
    th.className = asc ? 'sorted-asc' : 'sorted-desc';
    const rows = DATA.rows.slice().sort((a, b) => {
      const u = a[i], v = b[i];
      if (u === null) return 1; if (v === null) return -1;
      const c = typeof u === 'number' && typeof v === 'number' ? u - v : String(u).localeCompare(String(v));
      return asc ? c : -c;
    });
    fill(rows);
  }
}
function legend() {
  const lg = document.getElementById('legend');
  for (const run of DATA.runs) {
    const s = document.createElement('span');
    s.innerHTML = `<i style="background:${color(run)}"></i>`;
    s.appendChild(document.createTextNode(run)); lg.appendChild(s);
  }
}
function chooser() {
  const xs = document.getElementById('x'), ys = document.getElementById('y');
  const logx = document.getElementById('logx');
  for (const h of DATA.hparams) xs.add(new Option(h, h));
  for (const s of DATA.scores) ys.add(new Option(s, s));
  if (DATA.default_plots.length) { xs.value = DATA.default_plots[0][0]; ys.value = DATA.default_plots[0][1]; }
  else if (DATA.scores.includes('train_kl')) ys.value = 'train_kl';
  logx.checked = wide(xs.value);
  const draw = () => { const c = document.getElementById('chosen'); c.innerHTML = '';
                       plot(xs.value, ys.value, logx.checked, c); };
  xs.onchange = ys.onchange = logx.onchange = draw; draw();
}
// A hyperparameter spanning two decades or more (gamma, a learning rate) on a log axis.
const wide = x => { const v = DATA.rows.map(r => r[col(x)]).filter(v => typeof v === 'number');
  return v.length && Math.min(...v) > 0 && Math.max(...v) / Math.min(...v) >= 100; };
legend(); table(); chooser();
const grid = document.getElementById('grid');
for (const [x, y] of DATA.default_plots) plot(x, y, wide(x), grid);
document.body.dataset.plots = document.querySelectorAll('svg[data-points]').length;
document.body.dataset.ready = 'yes';
</script></body></html>
'''


def compare(paths: Sequence[str], out: str) -> dict[str, str]:
  """Writes ``out/results.csv`` and ``out/results.html`` for ``paths``;
  returns their paths and prints the text table."""
  df = load_results(paths)
  os.makedirs(out, exist_ok=True)
  written = {'csv': write_csv(df, os.path.join(out, 'results.csv')),
             'html': write_html(df, os.path.join(out, 'results.html'))}
  print(text_table(df))
  return written
