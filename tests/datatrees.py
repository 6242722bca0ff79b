"""The tests' miniature dataset trees: the writers live in ``stego_core.datatrees`` (``preflight --synthetic`` uses
them too); this module keeps the tests' ``from datatrees import ...`` working."""
from stego_core.datatrees import (  # noqa: F401
    make_cityscapes,
    make_cocostuff,
    make_directory,
    make_potsdam,
    write_synthetic_tree,
)
