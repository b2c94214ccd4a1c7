"""The files of a workdir, read and written so that no crash leaves them unreadable.

A workdir holds ``config.json`` and ``members.json`` (written whole, then
renamed into place), ``metrics.jsonl`` (one JSON row per member and logged
step, appended), ``checkpoints/chunk_NNN/STEP`` (orbax) and, after
evaluation, ``eval.json`` and ``report/``.

A crash can still tear the last line of ``metrics.jsonl`` (a kill or a full
disk mid-write). Readers here drop such a line with a warning, and name the
file and line of anything else that is not a JSON object.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from absl import logging

from capvae.errors import ConfigError

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
MEMBERS_FILE = 'members.json'
CHECKPOINT_DIR = 'checkpoints'


def write_json(path: str, obj) -> None:
  """Writes ``obj`` to ``path`` atomically (a temporary file, then a rename)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def _parse(path: str) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
  """``([(line, row)], torn)`` of a JSON-lines log; ``torn``: its last line was
  cut short (not JSON) and is left out."""
  with open(path) as f:
    lines = f.readlines()
  out, torn = [], False
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        torn = True
        break
      raise ConfigError(
          f'{path}, line {i + 1}: not valid JSON ({e.msg}, column {e.colno}); only the last'
          ' line can be torn by a crash. Repair or remove that line.') from None
    if not isinstance(row, dict):
      raise ConfigError(f'{path}, line {i + 1}: a metrics row must be a JSON object;'
                        f' got {type(row).__name__}.')
    out.append((line if line.endswith('\n') else line + '\n', row))
  return out, torn


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a ``metrics.jsonl``; a torn last line is skipped with a warning."""
  rows, torn = _parse(path)
  if torn:
    logging.warning('%s: its last line is torn (a crash mid-write?); skipped.', path)
  return [row for _, row in rows]


def truncate_metrics(path: str, member_ids: Iterable[int], restored_step: int) -> None:
  """Drops these members' rows of steps at or after their restored checkpoint,
  and a torn last line (with a warning), so that the resumed run appends to a
  log that an uninterrupted run would have written."""
  if not os.path.exists(path):
    return
  member_ids = set(member_ids)
  rows, torn = _parse(path)
  if torn:
    logging.warning('%s: dropping its torn last line (a crash mid-write?) before resuming.',
                    path)
  kept = [line for line, r in rows
          if r.get('member') not in member_ids or r.get('step', -1) < restored_step]
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    unterminated = f.tell() > 0 and (f.seek(-1, os.SEEK_END) or f.read(1)) != b'\n'
  if torn or unterminated or len(kept) != len(rows):
    with open(path + '.tmp', 'w') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)
