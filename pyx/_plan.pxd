# Pieces of the kernel plans that several kernel modules use (cimported, so each module
# keeps its plan next to its loops). Plans depend on the geometry and the tuning only,
# never on the thread count, so results do not either.


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # b > 0; rounds toward +infinity for either sign of a.
    return -((-a) // b) if a < 0 else (a + b - 1) // b


cdef inline list range_edges(lo, hi, Py_ssize_t size):
    """0, size and every tap range end inside (0, size), sorted: between two edges, each
    tap is in the image for all outputs or for none."""
    cdef set edges = {0, size}
    for v in lo.tolist() + hi.tolist():
        if 0 < v < size:
            edges.add(v)
    return sorted(edges)


cdef inline list rect_tiles(Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                            Py_ssize_t target):
    """Rectangles (r0, r1, c0, c1) of about `target` pixels covering rows [r0, r1) x
    columns [c0, c1): whole rows of the rectangle, or pieces of one row when a row is
    that long."""
    cdef Py_ssize_t height = r1 - r0, width = c1 - c0, tile_h, tile_w, r, c
    if height <= 0 or width <= 0:
        return []
    if width >= target:
        tile_h = 1
        tile_w = ceil_div(width, ceil_div(width, target))
    else:
        tile_w = width
        tile_h = ceil_div(height, ceil_div(height * width, target))
    return [(r, min(r1, r + tile_h), c, min(c1, c + tile_w))
            for r in range(r0, r1, tile_h) for c in range(c0, c1, tile_w)]


cdef inline Py_ssize_t largest_tile(const Py_ssize_t[:, ::1] tiles):
    """Pixels of the largest tile (r0, r1, c0, c1)."""
    cdef Py_ssize_t t, most = 0
    for t in range(tiles.shape[0]):
        most = max(most, (tiles[t, 1] - tiles[t, 0]) * (tiles[t, 3] - tiles[t, 2]))
    return most
