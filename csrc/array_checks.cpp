#include "array_checks.h"

#include <stdexcept>

namespace tileattn {

std::string shape_string(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

void require_ndim(const py::array& a, int ndim, const char* name) {
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + ": expected a " + std::to_string(ndim) +
                                "-D array, got shape " + shape_string(a));
}

void require_dtype(const py::array& a, const py::dtype& dt, const char* name) {
  if (!a.dtype().is(dt) && !a.dtype().equal(dt))
    throw std::invalid_argument(std::string(name) + ": expected dtype " +
                                py::str(dt).cast<std::string>() + ", got " +
                                py::str(a.dtype()).cast<std::string>());
}

void require_shape(const py::array& a, const std::vector<int64_t>& shape, const char* name) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    throw std::invalid_argument(std::string(name) + ": expected shape " + want + "), got " +
                                shape_string(a));
  }
}

void require_writeable(const py::array& a, const char* name) {
  if (!a.writeable()) throw std::invalid_argument(std::string(name) + ": array is read-only");
}

Strides4 strides_of(const py::array& a, const char* name) {
  require_ndim(a, 4, name);
  const py::ssize_t item = a.itemsize();
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a.data());
  if (addr % item != 0)
    throw std::invalid_argument(std::string(name) + ": data is not aligned to its item size");
  py::ssize_t s[4];
  for (int i = 0; i < 4; ++i) {
    if (a.strides(i) % item != 0)
      throw std::invalid_argument(std::string(name) +
                                  ": strides must be multiples of the item size");
    s[i] = a.strides(i) / item;
  }
  return Strides4{s[0], s[1], s[2], s[3]};
}

}  // namespace tileattn
