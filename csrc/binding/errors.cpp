#include "binding.h"
#include "errors.h"

void register_errors(py::module_ & m) {
    // the most derived classes must be registered last: pybind11 tries translators in
    // reverse order of registration
    static py::exception<pyllama_error> base(m, "PyllamaError", PyExc_RuntimeError);
    base.doc() = "Base class of every error raised by pyllama-inf itself.";

    py::register_exception<model_load_error>  (m, "ModelLoadError",   base.ptr())
        .doc() = "The model file could not be loaded or a context could not be created for it.";
    py::register_exception<context_full_error>(m, "ContextFullError", base.ptr())
        .doc() = "The tokens do not fit into the context (n_ctx).";
    py::register_exception<unsupported_error> (m, "UnsupportedError", base.ptr())
        .doc() = "The model or the requested configuration is not supported (yet).";
    py::register_exception<decode_error>      (m, "DecodeError",      base.ptr())
        .doc() = "llama.cpp failed to evaluate a batch.";
    py::register_exception<state_error>       (m, "StateError",       base.ptr())
        .doc() = "A saved state could not be written, or read into this model's context.";
}
