"""Training loops: InCA banks on activations, and end-to-end methods through the backbone."""
