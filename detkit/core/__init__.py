"""Building blocks every layer uses: atomic file writes and the export layout (``fsio``),
a quiet console (``tflog``), a lighter Keras start (``lean_keras``), both through
``first_import``."""
