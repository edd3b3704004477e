#pragma once

// The host tier of the InfLLM cache and the transfers between it and the device.
//
// llama_infllm_host_store: evicted blocks of every layer in host buffers —
// the device's host buffer type (pinned memory on CUDA) where it has one, CPU buffers
// otherwise — allocated in chunks of blocks as the context grows and kept for the next
// sequence (pinning memory is slow, and the next sequence likely grows as far).
//
// llama_infllm_transfer: a second backend instance of the device holding the cache (its own
// stream on CUDA); host<->device copies are issued on it with the *_async calls and waited
// for with ggml_backend_synchronize of that instance (which also completes the host side of
// staged copies). The CPU backend takes the same path (its async calls are plain copies).

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <cstddef>
#include <cstdint>
#include <vector>

class llama_infllm_host_store {
public:
    // k_row / v_row: bytes of one token's K / V row per layer
    llama_infllm_host_store(ggml_backend_buffer_type_t buft, std::vector<size_t> k_row, std::vector<size_t> v_row,
                            uint32_t block_size, uint32_t blocks_per_chunk);

    // bytes the store reaches when it holds n_blocks blocks
    size_t bytes_for(uint32_t n_blocks) const;

    // make room for blocks [0, n_blocks); throws std::bad_alloc-like
    // std::runtime_error when a host buffer cannot be allocated
    void reserve(uint32_t n_blocks);

    // K / V rows of block `blk` of layer `il`; reserved before
    uint8_t * k(uint32_t il, int32_t blk);
    uint8_t * v(uint32_t il, int32_t blk);

    size_t bytes() const { return n_bytes; }

    const uint32_t block_size;
    const uint32_t blocks_per_chunk;

private:
    uint8_t * at(uint32_t il, int32_t blk, bool v);

    ggml_backend_buffer_type_t buft;
    std::vector<size_t> k_row;
    std::vector<size_t> v_row;
    std::vector<size_t> k_off;   // per layer: offset of its K rows inside a chunk
    std::vector<size_t> v_off;
    size_t chunk_bytes = 0;      // all layers, blocks_per_chunk blocks

    std::vector<ggml_backend_buffer_ptr> chunks;
    size_t n_bytes = 0;
};

class llama_infllm_transfer {
public:
    explicit llama_infllm_transfer(ggml_backend_dev_t dev);

    // host -> device / device -> host, queued on the transfer backend; `counted`: add the
    // bytes to bytes_h2d / bytes_d2h (the block traffic; not the selection's block ids)
    void set(ggml_tensor * t, const void * data, size_t offset, size_t size);
    void get(const ggml_tensor * t, void * data, size_t offset, size_t size, bool counted = true);

    // wait until every queued copy is done (the time spent waiting is counted)
    void wait();

    const char * name() const;

    int64_t bytes_h2d = 0;
    int64_t bytes_d2h = 0;
    double  wait_s    = 0.0;

private:
    ggml_backend_ptr backend;
    bool pending = false;

public:
    ~llama_infllm_transfer();
    llama_infllm_transfer(const llama_infllm_transfer &) = delete;
    llama_infllm_transfer & operator=(const llama_infllm_transfer &) = delete;
};
