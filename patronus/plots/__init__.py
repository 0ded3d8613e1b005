"""Every figure and image grid of the package, in one place.

Matplotlib figures are rendered to uint8 (3, H, W) tensors, so the same picture goes to a PNG
file and to wandb/TensorBoard; image grids are torchvision grids. Analyses never draw: they
return tensors, and the command line and the training callbacks turn them into pictures here.
Figures are `matplotlib.figure.Figure` objects on their own Agg canvas (`render.subplots`): no
backend is selected and pyplot is never imported.

Modules: `render` (figure -> uint8 tensor / PNG), `images` (pixel conversions, grids, PNG files),
`galleries` (grids with receptive-field boxes), `charts` (heatmaps, histograms, curves), `maps`
(per-pixel maps over images, as mosaics), `report_figures` (the shortcut report and the sweep).
Everything is re-exported here: `from patronus import plots; plots.save_png(...)`.
"""

from patronus.plots.charts import (
    emergence_curve_plot,
    emergence_heatmap,
    faithfulness_figure,
    heatmap,
    histogram_figure,
    when_figure,
)
from patronus.plots.galleries import consistency_grid, localisation_gallery, patch_gallery
from patronus.plots.images import (
    display_image,
    reference_grid,
    save_png,
    save_rows,
    to_uint8_rgb,
    to_unit,
    unit_to_uint8,
)
from patronus.plots.maps import attribution_figure, information_figure, mosaic_figure, overlay_rgb, pid_figure
from patronus.plots.render import render, subplots
from patronus.plots.report_figures import maps_figure, score_figure, sweep_figure, unexplained_figure, worst_group_figure

__all__ = [
    "attribution_figure",
    "consistency_grid",
    "display_image",
    "emergence_curve_plot",
    "emergence_heatmap",
    "faithfulness_figure",
    "heatmap",
    "histogram_figure",
    "information_figure",
    "localisation_gallery",
    "maps_figure",
    "mosaic_figure",
    "overlay_rgb",
    "patch_gallery",
    "pid_figure",
    "reference_grid",
    "render",
    "save_png",
    "save_rows",
    "score_figure",
    "subplots",
    "sweep_figure",
    "to_uint8_rgb",
    "to_unit",
    "unexplained_figure",
    "unit_to_uint8",
    "when_figure",
    "worst_group_figure",
]
