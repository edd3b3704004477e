#include "llama-infllm-store.h"

#include "ggml.h"

#include <chrono>
#include <stdexcept>
#include <string>

//
// llama_infllm_host_store
//

llama_infllm_host_store::llama_infllm_host_store(
        ggml_backend_buffer_type_t buft, std::vector<size_t> k_row, std::vector<size_t> v_row,
        uint32_t block_size, uint32_t blocks_per_chunk) :
    block_size(block_size), blocks_per_chunk(blocks_per_chunk),
    buft(buft), k_row(std::move(k_row)), v_row(std::move(v_row)) {
    const size_t align = ggml_backend_buft_get_alignment(buft);
    auto pad = [align](size_t n) { return (n + align - 1)/align*align; };
    const size_t rows = (size_t) blocks_per_chunk*block_size;
    for (size_t il = 0; il < this->k_row.size(); ++il) {
        k_off.push_back(chunk_bytes);
        chunk_bytes += pad(this->k_row[il]*rows);
        v_off.push_back(chunk_bytes);
        chunk_bytes += pad(this->v_row[il]*rows);
    }
}

size_t llama_infllm_host_store::bytes_for(uint32_t n_blocks) const {
    const size_t n_chunks = (n_blocks + blocks_per_chunk - 1)/blocks_per_chunk;
    return n_chunks*chunk_bytes;
}

void llama_infllm_host_store::reserve(uint32_t n_blocks) {
    auto alloc = [&](size_t size) {
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, size);
        if (buf == nullptr) {
            throw std::runtime_error("InfLLM cache: could not allocate " + std::to_string(size) +
                                     " bytes of host memory for the block store");
        }
        n_bytes += size;
        return ggml_backend_buffer_ptr(buf);
    };
    while ((size_t) chunks.size()*blocks_per_chunk < n_blocks) {
        chunks.push_back(alloc(chunk_bytes));
    }
}

uint8_t * llama_infllm_host_store::at(uint32_t il, int32_t blk, bool v) {
    auto * base = (uint8_t *) ggml_backend_buffer_get_base(chunks.at(blk/blocks_per_chunk).get());
    const size_t in_chunk = (size_t) (blk % blocks_per_chunk)*block_size;
    return base + (v ? v_off[il] + in_chunk*v_row[il] : k_off[il] + in_chunk*k_row[il]);
}

uint8_t * llama_infllm_host_store::k(uint32_t il, int32_t blk) {
    return at(il, blk, false);
}

uint8_t * llama_infllm_host_store::v(uint32_t il, int32_t blk) {
    return at(il, blk, true);
}

//
// llama_infllm_transfer
//

llama_infllm_transfer::llama_infllm_transfer(ggml_backend_dev_t dev) {
    backend.reset(ggml_backend_dev_init(dev, nullptr));
    if (!backend) {
        throw std::runtime_error(std::string("InfLLM cache: could not start a transfer backend on ") +
                                 ggml_backend_dev_name(dev));
    }
}

llama_infllm_transfer::~llama_infllm_transfer() {
    if (pending) {
        ggml_backend_synchronize(backend.get());
    }
}

void llama_infllm_transfer::set(ggml_tensor * t, const void * data, size_t offset, size_t size) {
    ggml_backend_tensor_set_async(backend.get(), t, data, offset, size);
    bytes_h2d += (int64_t) size;
    pending = true;
}

void llama_infllm_transfer::get(const ggml_tensor * t, void * data, size_t offset, size_t size, bool counted) {
    ggml_backend_tensor_get_async(backend.get(), t, data, offset, size);
    bytes_d2h += counted ? (int64_t) size : 0;
    pending = true;
}

void llama_infllm_transfer::wait() {
    if (!pending) {
        return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    // not an event: the async copies of some backends (Vulkan) finish their host-side part
    // (staging <-> host memory) only in synchronize; on CUDA this waits for the transfer stream
    ggml_backend_synchronize(backend.get());
    wait_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    pending = false;
}

const char * llama_infllm_transfer::name() const {
    return ggml_backend_name(backend.get());
}
