// Checks on the arrays handed to the private _core module. The Python layer
// validates and shapes everything first and raises the typed errors users
// see; these checks are a second line so that a direct call with bad
// arrays raises ValueError instead of reading out of bounds.
#pragma once

#include <pybind11/numpy.h>

#include <string>

#include "attention_params.h"

namespace tileattn {

namespace py = pybind11;

// The array's strides in elements, for a 4-D array (throws otherwise).
Strides4 strides_of(const py::array& a, const char* name);
void require_ndim(const py::array& a, int ndim, const char* name);
void require_dtype(const py::array& a, const py::dtype& dt, const char* name);
void require_shape(const py::array& a, const std::vector<int64_t>& shape, const char* name);
void require_writeable(const py::array& a, const char* name);
std::string shape_string(const py::array& a);

}  // namespace tileattn
