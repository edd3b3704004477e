#pragma once

#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_errors (py::module_ & m);
void register_log    (py::module_ & m);
void register_session(py::module_ & m);
