"""The figures the commands write: readable layouts (no label drawn over another)."""

from implicit_lm.eval import plots, state_tracking


def test_length_generalization_rows_do_not_overlap(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(state_tracking, "save_figure", lambda figure, path: figures.append(figure))

    def rows(mode, accuracy):
        return [dict(mode=mode, length=n, accuracy=accuracy, iterations_mean=None if mode == "explicit" else 9.0)
                for n in (16, 64, 256, 1024)]

    panel = {"implicit": {"rows": rows("sequential", 0.99)}, "explicit": {"rows": rows("explicit", 0.5)}}
    state_tracking.plot_length_generalization({"S5": panel, "A5": panel}, tmp_path / "figure.png", train_length=32)
    (figure,) = figures
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes  # row-major: (S5 accuracy, S5 iterations, A5 accuracy, A5 iterations)
    for upper, lower in zip(axes[:2], axes[2:]):
        label = upper.xaxis.label.get_window_extent(renderer)
        ticks = upper.xaxis.get_tightbbox(renderer)
        title = lower.title.get_window_extent(renderer)
        assert not label.overlaps(title) and not ticks.overlaps(title)
    plots.save_figure(figure, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 0
