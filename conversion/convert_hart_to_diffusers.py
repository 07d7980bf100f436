"""Convert a released HART checkpoint into a diffusers folder.

The implementation lives in the package (`diffusers_hart.conversion.convert_hart_to_diffusers`,
also installed as `hart-convert`) so that `HARTPipeline.from_original` can use it too.
"""

from diffusers_hart.conversion.convert_hart_to_diffusers import main

if __name__ == "__main__":
    main()
