"""Task configs (YAML) installed with ensir-flow as `ensir_flow.configs`, selectable by name: `--config deblurring-gopro`."""
