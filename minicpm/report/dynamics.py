"""dynamics.png for `minicpm report`: the decay dynamics of paper §4.4 (run.dynamics) against the step, with the
learning rate, so that the decay's effect on the gradients and the curvature shows."""

from __future__ import annotations

PANELS = (("grad_norm", "gradient norm", True), ("dynamics/update_norm", "weight-update norm", True),
          ("dynamics/grad_cos", "cos(g(t), g(t-1))", False), ("dynamics/d1", "D1 along the update", False),
          ("dynamics/d2", "D2 along the update", False), ("dynamics/curvature", "curvature K", True))


def dynamics_plot(runs) -> bytes | None:
    """Six panels (gradient norm, update norm, consecutive-gradient cosine, D1, D2, curvature) vs step, one line per
    run, the learning rate dotted; None when no run logged dynamics."""
    if not any("dynamics/grad_cos" in r for run in runs for r in run.train):
        return None
    from minicpm.plots import figure, png_bytes

    fig = figure(11, 7.5)
    axes = fig.subplots(3, 2).flatten()
    for ax, (key, title, log) in zip(axes, PANELS):
        lr_axis = ax.twinx()
        for i, run in enumerate(runs):
            points = [(r["step"], r[key]) for r in run.train if key in r]
            if points:
                ax.plot(*zip(*points), color=f"C{i % 10}", lw=1.1, label=run.name)
            lr_axis.plot([r["step"] for r in run.train], [r["lr"] for r in run.train], color=f"C{i % 10}", lw=0.8,
                         ls=":", alpha=0.7)
        if log:
            ax.set_yscale("log")
        lr_axis.set_ylim(bottom=0)
        lr_axis.tick_params(labelsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("decay dynamics (paper §4.4); learning rate dotted")
    return png_bytes(fig)
