// The _core extension: one register_<thing>() per file, no logic here.

#include "binding.h"

PYBIND11_MODULE(_core, m) {
    m.doc() = "pyllama-inf native core: llama.cpp model, context and generation loop";
    m.attr("upstream_commit") = PYLLAMA_INF_UPSTREAM_COMMIT;
    register_errors(m);
    register_log(m);
    register_session(m);
}
