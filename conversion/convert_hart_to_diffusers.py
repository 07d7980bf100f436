"""Convert a released HART checkpoint into a diffusers folder (the same command as `hart-convert`).

The implementation lives in the package, `diffusers_hart.conversion`, which also offers it as a function:
`diffusers_hart.conversion.from_original(checkpoint_path, text_encoder_path)` builds the pipeline without saving it.
"""

import sys

from diffusers_hart.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
