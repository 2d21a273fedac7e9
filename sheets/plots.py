"""Pictures of a fit: the RMSE after each iteration, one panel per sheet."""

import io

from sheets.writer import write_atomically


def save_rmse_plot(path, rows):
    """Save a PNG of RMSE per iteration; ``rows`` are (sheet, FitResult, written) tuples."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    sheets = list(dict.fromkeys(sheet for sheet, _, _ in rows))
    figure, axes = plt.subplots(1, len(sheets), figsize=(5 * len(sheets), 4), squeeze=False)
    for ax, sheet in zip(axes[0], sheets):
        for name, result, written in rows:
            if name == sheet:
                label = f"{result.engine} ({result.device}): {result.final_rmse:.4f}"
                ax.plot(range(len(result.history)), result.history,
                        label=label + (" *" if written else ""))
        ax.set_xscale("symlog", linthresh=10)
        ax.set_title(sheet)
        ax.set_xlabel("iteration")
        ax.set_ylabel("RMSE over rated cells")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()

    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    write_atomically(path, image.getvalue())
