"""ReAlign (Fan et al. 2024): rewrite a dataset's responses into task-specific formats, keeping the original
whenever a rewrite looks broken. `stage.py` is the entry point (`method=realign`)."""
