"""What a matplotlib figure drew, read back from its artists before it is saved (the tests of report.png and
sweep.png check the drawn error bars, not only that a PNG exists)."""

from __future__ import annotations


def error_bars(fig) -> dict[tuple[str, str], tuple[float, float, float]]:
    """{(axes title, error bar label): (mean, low, high)}: the marker's height and the vertical bar's ends of
    every error bar in `fig`."""
    from matplotlib.container import ErrorbarContainer

    out = {}
    for ax in fig.axes:
        for c in ax.containers:
            if isinstance(c, ErrorbarContainer):
                data_line, _caps, (bars, *_) = c.lines
                (_x, mean), = data_line.get_xydata()
                (segment,) = bars.get_segments()
                low, high = sorted(float(y) for _, y in segment)
                out[(ax.get_title(), c.get_label())] = (float(mean), low, high)
    return out


def flat(bars: dict) -> dict:
    """{(key, "mean" | "low" | "high"): value}: error bars as pytest.approx compares them (it takes no nesting)."""
    return {(key, end): value for key, bar in bars.items() for end, value in zip(("mean", "low", "high"), bar,
                                                                                 strict=True)}
