#pragma once

#include <stdexcept>
#include <string>

// C++ exceptions thrown by the binding; register_errors() maps each to a Python class of the
// PyllamaError hierarchy. Bad arguments use pybind11::value_error (-> ValueError).

struct pyllama_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct model_load_error : pyllama_error {
    using pyllama_error::pyllama_error;
};

struct context_full_error : pyllama_error {
    using pyllama_error::pyllama_error;
};

struct unsupported_error : pyllama_error {
    using pyllama_error::pyllama_error;
};

struct decode_error : pyllama_error {
    using pyllama_error::pyllama_error;
};

struct state_error : pyllama_error {
    using pyllama_error::pyllama_error;
};
