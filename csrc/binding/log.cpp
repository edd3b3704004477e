// Routes llama.cpp / ggml log messages to a Python callable (level, message).
//
// llama.cpp emits a line in several pieces (GGML_LOG_LEVEL_CONT continues the previous
// one); pieces are joined here and the callable gets whole lines without the newline.
// Locking: the line buffer is guarded by a mutex that is never held while the GIL is
// taken; the handler object itself is only touched with the GIL held.

#include "binding.h"

#include "llama.h"

#include <atomic>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

std::atomic<bool> g_enabled{false};
PyObject *        g_handler = nullptr;   // strong reference; guarded by the GIL

std::mutex        g_mutex;               // guards the two below
std::string       g_line;
ggml_log_level    g_level = GGML_LOG_LEVEL_INFO;

using log_lines = std::vector<std::pair<ggml_log_level, std::string>>;

void emit(const log_lines & lines) {
    if (lines.empty() || !g_enabled.load() || !Py_IsInitialized()) {
        return;
    }
    py::gil_scoped_acquire gil;
    for (const auto & [level, text] : lines) {
        if (g_handler == nullptr) {
            return;
        }
        PyObject * msg = PyUnicode_DecodeUTF8(text.data(), (Py_ssize_t) text.size(), "replace");
        PyObject * res = msg ? PyObject_CallFunction(g_handler, "iO", (int) level, msg) : nullptr;
        Py_XDECREF(msg);
        if (res == nullptr) {
            PyErr_WriteUnraisable(g_handler);   // a broken handler must not break decoding
        } else {
            Py_DECREF(res);
        }
    }
}

void log_callback(ggml_log_level level, const char * text, void * /*user_data*/) {
    if (!g_enabled.load()) {
        return;
    }
    log_lines ready;
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        if (level != GGML_LOG_LEVEL_CONT) {
            if (!g_line.empty()) {
                ready.emplace_back(g_level, std::move(g_line));
                g_line.clear();
            }
            g_level = level;
        }
        for (const char * p = text; *p; ++p) {
            if (*p == '\n') {
                ready.emplace_back(g_level, std::move(g_line));
                g_line.clear();
            } else {
                g_line.push_back(*p);
            }
        }
    }
    emit(ready);
}

void set_log_handler(py::object handler) {
    PyObject * old = g_handler;
    g_handler = handler.is_none() ? nullptr : handler.release().ptr();
    g_enabled.store(g_handler != nullptr);
    Py_XDECREF(old);
    llama_log_set(log_callback, nullptr);
}

} // namespace

void register_log(py::module_ & m) {
    m.def("set_log_handler", &set_log_handler, py::arg("handler"),
          "Send llama.cpp log lines to handler(level: int, message: str); None drops them.\n"
          "Levels follow ggml: 1 debug, 2 info, 3 warn, 4 error.");
}
