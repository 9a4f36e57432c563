// Handing C++ results to numpy, shared by the binding files.
#pragma once

#include <pybind11/numpy.h>

#include <utility>
#include <vector>

namespace hexfast {

// Moves a vector into a numpy array of the given shape, without a copy: the array owns the buffer.
template <class T>
pybind11::array_t<T> to_numpy(std::vector<T>&& v, std::vector<pybind11::ssize_t> shape) {
    auto* owned = new std::vector<T>(std::move(v));
    pybind11::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
    return pybind11::array_t<T>(shape, owned->data(), free_when_done);
}

}  // namespace hexfast
