"""The application layer: the root `avb` command group and the commands that join both stages for a user
(`demo`, `predict`, `score`, `corpus check`). It sits on top of everything (app -> extract -> heads -> cache) and
holds no model, training or file-format code of its own."""
