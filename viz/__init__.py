"""viz: Plotly figures and self-contained HTML reports (imports result types only)."""
