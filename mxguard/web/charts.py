"""Dashboard charts as server-side SVG (pygal), served as images: no script runs in the page.

pygal's tooltips script is turned off (``js=[]``) and the small inline
configuration script pygal always writes is removed from the SVG tree, so the
image holds no script at all and needs nothing from outside; it is served as
``image/svg+xml`` with its own strict CSP.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pygal
from pygal.style import Style

from mxguard.services.stats import TlsShare

#: Colours per disposition, stable across charts.
DISPOSITION_COLOURS = {
    "delivered": "#2e7d32", "partial": "#9e9d24", "deferred": "#ef6c00", "spooled": "#6d4c41",
    "quarantined": "#6a1b9a", "rejected": "#c62828", "aborted": "#757575",
    "tls-report": "#00838f",
}

_BASE = dict(background="white", plot_background="white", foreground="#333", foreground_strong="#111",
             foreground_subtle="#bbb", font_family="DejaVu Sans, sans-serif", label_font_size=11,
             major_label_font_size=11, legend_font_size=12, title_font_size=14)


def _config(**extra):
    base = dict(js=[], disable_xml_declaration=False, width=720, height=320, explicit_size=True,
                legend_at_bottom=True, legend_at_bottom_columns=4, truncate_legend=-1, margin=16,
                margin_bottom=24)
    return {**base, **extra}


_SVG = "http://www.w3.org/2000/svg"
ET.register_namespace("", _SVG)
ET.register_namespace("xlink", "http://www.w3.org/1999/xlink")


def _without_scripts(svg: bytes) -> bytes:
    root = ET.fromstring(svg)
    for parent in root.iter():
        for child in list(parent):
            if child.tag in (f"{{{_SVG}}}script", "script"):
                parent.remove(child)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def messages_per_hour(labels: list[str], series: dict[str, list[int]]) -> bytes:
    """Stacked bars: messages per hour (x: hour, UTC), one colour per disposition."""
    names = list(series) or ["delivered"]
    style = Style(colors=tuple(DISPOSITION_COLOURS.get(n, "#1565c0") for n in names), **_BASE)
    chart = pygal.StackedBar(style=style, **_config(title="Messages per hour by disposition (UTC)",
                                                    x_label_rotation=0, show_minor_x_labels=False,
                                                    truncate_label=-1, print_values=False,
                                                    no_data_text="No messages in the last 24 hours"))
    chart.x_labels = [label[11:13] for label in labels]
    chart.x_labels_major = [label[11:13] for label in labels[::3]]
    for name in series:
        chart.add(name, series[name])
    return _without_scripts(chart.render())


def tls_shares(share: TlsShare, title: str = "TLS share, last 24 hours") -> bytes:
    """Horizontal bars: % of transactions with inbound TLS, % of downstream deliveries with TLS and verified."""
    style = Style(colors=("#1565c0", "#2e7d32", "#00838f"), **_BASE)
    chart = pygal.HorizontalBar(style=style, **_config(title=title, range=(0, 100), print_values=True,
                                                       value_formatter=lambda v: f"{v:.1f} %",
                                                       no_data_text="No transactions in the last 24 hours",
                                                       height=300, legend_at_bottom_columns=1))
    if share.transactions:
        chart.add(f"Inbound sessions with TLS ({share.inbound_tls}/{share.transactions})", [share.inbound_pct or 0])
    if share.downstream:
        chart.add(f"Downstream with TLS ({share.downstream_tls}/{share.downstream})", [share.downstream_pct or 0])
        chart.add(f"Downstream verified ({share.downstream_verified}/{share.downstream})", [share.verified_pct or 0])
    return _without_scripts(chart.render())


def tls_report_sessions(days: list[str], successful: list[int], failed: list[int]) -> bytes:
    """Stacked bars: TLS sessions per UTC day that other senders' TLS-RPT reports count (RFC 8460)."""
    style = Style(colors=("#2e7d32", "#c62828"), **_BASE)
    chart = pygal.StackedBar(style=style, **_config(title="Sessions reported per day (UTC)", x_label_rotation=0,
                                                    show_minor_x_labels=False, truncate_label=-1,
                                                    print_values=False, legend_at_bottom_columns=2,
                                                    no_data_text="No TLS reports in this window"))
    chart.x_labels = [d[5:] for d in days]
    chart.x_labels_major = [d[5:] for d in days[::max(1, len(days) // 10)]]
    if any(successful) or any(failed):
        chart.add("successful", successful)
        chart.add("failed", failed)
    return _without_scripts(chart.render())
