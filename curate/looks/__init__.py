"""Read-only views of a workspace: the terminal heatmap, the HTML report, the plots. Above the stages."""
