"""A toy world where quality is measurable on a CPU: coloured, patterned shapes in geometric relations
(``world``), and an exact oracle that reads a render back (``oracle``). numpy, Pillow and scipy only."""
