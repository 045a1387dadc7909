"""Model definitions: one file per model, module paths equal to the official checkpoint keys."""
