# Shared CPU geometry: bilinear sampling in the conventions the ops use (RoIAlign's as per-axis
# factors, roi_linear below; deformable convolution's as zero_pad_bilinear).
# zero_pad_bilinear fills four element offsets (into one H x W plane) and four weights; weights
# are 0 and offsets 0 for samples/corners outside the map, so reads always stay in bounds.
# NaN coordinates count as outside in both.
from _types cimport floating


cdef inline bint zero_pad_bilinear(floating y, floating x, Py_ssize_t H, Py_ssize_t W,
                                   Py_ssize_t* o, floating* wt) noexcept nogil:
    """Deformable-convolution convention (torchvision deform_conv2d): zero padding around the
    map; a sample with y <= -1, y >= H, x <= -1 or x >= W is 0. False when outside."""
    cdef Py_ssize_t y0, x0, y1, x1
    cdef floating ly, lx, hy, hx, yf, xf
    o[0] = 0; o[1] = 0; o[2] = 0; o[3] = 0
    wt[0] = 0; wt[1] = 0; wt[2] = 0; wt[3] = 0
    if not (y > -1 and y < H and x > -1 and x < W):
        return False
    y0 = <Py_ssize_t>y if y >= 0 else -1      # floor on (-1, H)
    x0 = <Py_ssize_t>x if x >= 0 else -1
    y1 = y0 + 1
    x1 = x0 + 1
    ly = y - y0
    lx = x - x0
    hy = 1 - ly
    hx = 1 - lx
    if y0 >= 0 and x0 >= 0:
        o[0] = y0 * W + x0; wt[0] = hy * hx
    if y0 >= 0 and x1 <= W - 1:
        o[1] = y0 * W + x1; wt[1] = hy * lx
    if y1 <= H - 1 and x0 >= 0:
        o[2] = y1 * W + x0; wt[2] = ly * hx
    if y1 <= H - 1 and x1 <= W - 1:
        o[3] = y1 * W + x1; wt[3] = ly * lx
    return True


# ---- roi_linear (appended for fastnorm._cpu.roi_ops) ----------------------------------------
# One axis of `roi_bilinear`: the RoIAlign bilinear weight is the product of two of these factors,
# so per-axis tables of (index, weight) give the same samples. Returns 0 when the coordinate is
# outside [-1, L] (or NaN) -> the sample contributes 0; 1 when inside but clamped (coordinate
# <= 0 or >= L - 1: the value does not depend on it there); 2 when strictly interior.
# i0/i1 are the two neighbouring indices and l the weight of i1 (the weight of i0 is 1 - l).
cdef inline int roi_linear(floating y, Py_ssize_t L, Py_ssize_t* i0, Py_ssize_t* i1,
                           floating* l) noexcept nogil:
    cdef int kind = 2
    if not (y >= -1 and y <= L) or L <= 0:
        i0[0] = 0; i1[0] = 0; l[0] = 0
        return 0
    if y <= 0:
        y = 0
        kind = 1
    i0[0] = <Py_ssize_t>y
    if i0[0] >= L - 1:
        i0[0] = L - 1
        i1[0] = L - 1
        y = <floating>(L - 1)
        kind = 1
    else:
        i1[0] = i0[0] + 1
    l[0] = y - i0[0]
    return kind
