"""The HTML frame of a report: one self-contained page (inline CSS and JavaScript, no network).

The page records its own script errors: ``<body data-errors="N">`` counts uncaught errors and
``console.error`` calls (their messages are listed in ``#mixq-errors``), and ``data-ready="1"`` is set
once the page's script has run, so that a headless browser can check both from the DOM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:14px 28px}header h1{margin:0;font-size:20px}
header .sub{color:#cbd5e1;font-size:13px}main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e2e5ea;border-radius:6px;margin:16px 0;padding:12px 18px;overflow-x:auto}
h2{font-size:16px;margin:4px 0 10px}table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border-bottom:1px solid #e5e7eb;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f3f4f6;cursor:pointer;user-select:none}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.hl td{background:#fff7d6}dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:4px 0}
dl.facts dt{color:#555}dl.facts dd{margin:0}svg text{font-size:11px;fill:#333}svg .axis{font-size:12px}
svg .legend{font-size:11px}svg .note{font-size:10px;fill:#555}svg .celltext{font-size:10px}
svg .grid{stroke:#e5e7eb}svg .pt{cursor:pointer;stroke:#fff;stroke-width:1}svg .pt:hover,svg .cell:hover{stroke:#000;stroke-width:1.5}
#tip{position:fixed;pointer-events:none;background:#111;color:#fff;padding:5px 8px;border-radius:4px;font-size:12px;
white-space:pre-line;max-width:520px;display:none;z-index:9}.muted{color:#666}.choice[hidden]{display:none}
label.switch{margin-right:10px}#mixq-errors{color:#b91c1c}
"""

ERROR_RECORDER = """
(function(){
  var count = 0;
  function record(message){
    count += 1;
    document.body.setAttribute('data-errors', String(count));
    var box = document.getElementById('mixq-errors');
    if (box) { var li = document.createElement('li'); li.textContent = message; box.appendChild(li); }
  }
  window.addEventListener('error', function(e){ record('error: ' + (e.message || e.type)); });
  window.addEventListener('unhandledrejection', function(e){ record('rejection: ' + e.reason); });
  var original = console.error;
  console.error = function(){ record('console.error: ' + Array.prototype.join.call(arguments, ' '));
                              return original.apply(console, arguments); };
})();
"""

SCRIPT = """
(function(){
  var tip = document.getElementById('tip');
  document.addEventListener('mouseover', function(e){
    var t = e.target.closest ? e.target.closest('[data-tip]') : null;
    if (!t) { tip.style.display = 'none'; return; }
    tip.textContent = t.getAttribute('data-tip'); tip.style.display = 'block';
  });
  document.addEventListener('mousemove', function(e){
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - 540) + 'px';
    tip.style.top = (e.clientY + 14) + 'px';
  });
  function show(group, value){
    document.querySelectorAll('[data-group="' + group + '"]').forEach(function(el){
      el.hidden = el.getAttribute('data-choice') !== value;
    });
    var sel = document.querySelector('select[data-switch="' + group + '"]');
    if (sel && sel.value !== value) { sel.value = value; }
  }
  document.querySelectorAll('select[data-switch]').forEach(function(sel){
    sel.addEventListener('change', function(){ show(sel.getAttribute('data-switch'), sel.value); });
    show(sel.getAttribute('data-switch'), sel.value);
  });
  document.querySelectorAll('[data-key]').forEach(function(pt){
    pt.addEventListener('click', function(){
      var key = pt.getAttribute('data-key');
      document.querySelectorAll('select[data-switch]').forEach(function(sel){
        if (Array.prototype.some.call(sel.options, function(o){ return o.value === key; })) {
          show(sel.getAttribute('data-switch'), key);
        }
      });
      document.querySelectorAll('tr[data-key]').forEach(function(tr){
        tr.classList.toggle('hl', tr.getAttribute('data-key') === key);
      });
    });
  });
  document.querySelectorAll('table.sortable th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var table = th.closest('table'), body = table.tBodies[0];
      var index = Array.prototype.indexOf.call(th.parentNode.children, th);
      var rows = Array.prototype.slice.call(body.rows);
      var up = th.getAttribute('data-dir') !== 'up';
      th.setAttribute('data-dir', up ? 'up' : 'down');
      function key(r){ var c = r.cells[index]; var v = c ? c.getAttribute('data-v') : null;
                       return v !== null ? parseFloat(v) : (c ? c.textContent : ''); }
      rows.sort(function(a, b){ var x = key(a), y = key(b);
        if (typeof x === 'number' && typeof y === 'number') { return up ? x - y : y - x; }
        return up ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x)); });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
  document.body.setAttribute('data-ready', '1');
})();
"""


def cell(value: Any, digits: int = 4) -> str:
    """One ``<td>``: numbers right-aligned with ``digits`` significant digits (sortable by value), None
    and NaN as ``-``, anything else as escaped text."""
    if isinstance(value, bool) or value is None:
        return f"<td>{'-' if value is None else ('yes' if value else '')}</td>"
    if isinstance(value, int | float):
        if not math.isfinite(float(value)):
            return "<td class=num>-</td>"
        text = str(value) if isinstance(value, int) else f"{value:.{digits}g}"
        return f'<td class=num data-v="{float(value)!r}">{text}</td>'
    return f"<td>{escape(str(value))}</td>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, keys: Sequence[str | None] | None = None,
          table_id: str | None = None) -> str:
    """A sortable HTML table; ``keys[i]`` (optional) tags row ``i`` so that a click on the plot point
    with that key highlights it. Raw HTML is never taken from ``rows``: every value is escaped."""
    ident = f' id="{escape(table_id)}"' if table_id else ""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        key = keys[i] if keys is not None else None
        attr = f' data-key="{escape(key)}"' if key is not None else ""
        body.append(f"<tr{attr}>" + "".join(cell(v) for v in row) + "</tr>")
    return f'<table class="sortable"{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def facts(items: Mapping[str, Any]) -> str:
    """A definition list of ``name: value`` pairs (None values left out)."""
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v if isinstance(v, str) else _short(v))}</dd>"
                   for k, v in items.items() if v is not None)
    return f'<dl class="facts">{rows}</dl>'


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    if isinstance(v, list | tuple):
        return ", ".join(_short(x) for x in v)
    return str(v)


def section(title: str, body: str, section_id: str) -> str:
    """A titled ``<section>``; ``body`` is HTML made by this package's helpers."""
    return f'<section id="{escape(section_id)}"><h2>{escape(title)}</h2>{body}</section>'


def switcher(group: str, label: str, choices: Sequence[tuple[str, str, str]]) -> str:
    """A ``<select>`` showing one of several blocks: ``choices`` = (value, option text, block HTML); the
    first is shown. A click on a plot point whose key equals a value shows that block too."""
    if not choices:
        return ""
    options = "".join(f'<option value="{escape(v)}">{escape(t)}</option>' for v, t, _ in choices)
    blocks = "".join(f'<div class="choice" data-group="{escape(group)}" data-choice="{escape(v)}"'
                     f'{"" if i == 0 else " hidden"}>{html}</div>' for i, (v, _, html) in enumerate(choices))
    return (f'<p><label class="switch">{escape(label)} <select data-switch="{escape(group)}">{options}</select>'
            f"</label></p>{blocks}")


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole HTML document: header, the error recorder (first thing in the body), the sections,
    the tooltip element and the page script."""
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>"
            f'<body data-errors="0" data-ready="0"><script>{ERROR_RECORDER}</script>'
            f"<header><h1>{escape(title)}</h1><div class=sub>{escape(subtitle)}</div></header>"
            f'<main>{"".join(sections)}<ul id="mixq-errors"></ul></main><div id="tip"></div>'
            f"<script>{SCRIPT}</script></body></html>\n")
