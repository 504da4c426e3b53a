"""The builder of the bundled demo model lake: real base models, real fine-tunes, Hub-shaped repos."""
