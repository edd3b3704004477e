// Saving and loading a context's memory (the stock cache, the InfLLM cache, the sliding-window
// composition) to a file of its own format:
//
//   "PYLINFST" | u32 version | u32 0 | u64 head_len | head (the caller's bytes) |
//   payload (the memory's state_write) | u64 payload_len | u64 checksum of everything before it
//
// Written to a temporary name and renamed, so a failed save never leaves a partial file at
// the path. A load checks the checksum over the whole file before it touches the memory, so a
// truncated or corrupted file is refused with the context unchanged; a payload that passes
// the checksum but does not fit this memory (another model or config) is refused by the
// caches' own checks and leaves the memory cleared.

#include "llama-infllm.h"

#include "llama-io.h"
#include "llama-memory.h"

#include "ggml-backend.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr char     STATE_MAGIC[8] = {'P', 'Y', 'L', 'I', 'N', 'F', 'S', 'T'};
constexpr uint32_t STATE_VERSION  = 1;
constexpr size_t   STATE_FIXED    = 8 + 4 + 4 + 8;   // magic, version, reserved, head_len
constexpr size_t   STATE_TRAILER  = 8 + 8;           // payload_len, checksum

// FNV-1a over 64-bit words (the last one zero-padded), then the length: any change of one
// word, and any truncation, changes the result
class checksum {
public:
    void update(const void * data, size_t size) {
        const auto * p = static_cast<const uint8_t *>(data);
        n_total += size;
        while (size > 0 && n_tail > 0) {
            tail[n_tail++] = *p++;
            --size;
            if (n_tail == 8) {
                word(tail);
                n_tail = 0;
            }
        }
        for (; size >= 8; p += 8, size -= 8) {
            word(p);
        }
        while (size > 0) {
            tail[n_tail++] = *p++;
            --size;
        }
    }

    uint64_t digest() const {
        checksum c = *this;
        if (c.n_tail > 0) {
            std::memset(c.tail + c.n_tail, 0, 8 - c.n_tail);
            c.word(c.tail);
        }
        return (c.h ^ c.n_total)*PRIME;
    }

private:
    static constexpr uint64_t PRIME = 0x100000001b3ull;
    uint64_t h       = 0xcbf29ce484222325ull;
    uint64_t n_total = 0;
    uint8_t  tail[8] = {};
    size_t   n_tail  = 0;

    void word(const uint8_t * p) {
        uint64_t w;
        std::memcpy(&w, p, 8);
        h = (h ^ w)*PRIME;
    }
};

struct file_closer {
    void operator()(FILE * f) const { std::fclose(f); }
};
using file_ptr = std::unique_ptr<FILE, file_closer>;

std::string sys_error(const std::string & what, const std::string & path) {
    return what + " '" + path + "': " + std::strerror(errno);
}

class state_writer : public llama_io_write_i {
public:
    state_writer(FILE * f, checksum & sum, std::string path) : f(f), sum(sum), path(std::move(path)) {}

    void write(const void * src, size_t size) override {
        if (size > 0 && std::fwrite(src, 1, size, f) != size) {
            throw std::runtime_error(sys_error("could not write", path));
        }
        sum.update(src, size);
        n += size;
    }

    void write_tensor(ggml_tensor * tensor, size_t offset, size_t size) override {
        tmp.resize(size);
        ggml_backend_tensor_get(tensor, tmp.data(), offset, size);
        write(tmp.data(), size);
    }

    size_t n_bytes() override { return n; }

private:
    FILE * f;
    checksum & sum;
    std::string path;
    size_t n = 0;
    std::vector<uint8_t> tmp;
};

class state_reader : public llama_io_read_i {
public:
    state_reader(FILE * f, size_t size) : f(f), left(size) {}

    void read(void * dst, size_t size) override {
        if (size > left) {
            throw std::runtime_error("the saved state ends early (" + std::to_string(left) + " bytes left, " +
                                     std::to_string(size) + " wanted)");
        }
        if (size > 0 && std::fread(dst, 1, size, f) != size) {
            throw std::runtime_error("could not read the saved state");
        }
        left -= size;
        n += size;
    }

    void read_tensor(ggml_tensor * tensor, size_t offset, size_t size) override {
        if (offset > ggml_nbytes(tensor) || size > ggml_nbytes(tensor) - offset) {
            throw std::runtime_error("the saved state does not fit this cache's tensors");
        }
        tmp.resize(size);
        read(tmp.data(), size);
        ggml_backend_tensor_set(tensor, tmp.data(), offset, size);
    }

    size_t n_bytes() override { return n; }
    size_t remaining() const { return left; }

private:
    FILE * f;
    size_t left;
    size_t n = 0;
    std::vector<uint8_t> tmp;
};

void write_u64(FILE * f, checksum * sum, uint64_t v, const std::string & path) {
    if (std::fwrite(&v, 1, 8, f) != 8) {
        throw std::runtime_error(sys_error("could not write", path));
    }
    if (sum != nullptr) {
        sum->update(&v, 8);
    }
}

int32_t fail(char * err, size_t err_size, const std::string & why, int32_t code) {
    if (err != nullptr && err_size > 0) {
        std::snprintf(err, err_size, "%s", why.c_str());
    }
    return code;
}

} // namespace

int32_t llama_infllm_state_save(llama_context * ctx, const char * path, const void * head, size_t head_len,
                                char * err, size_t err_size) {
    if (ctx == nullptr || path == nullptr || (head == nullptr && head_len > 0)) {
        return fail(err, err_size, "invalid arguments", -1);
    }
    llama_memory_t mem = llama_get_memory(ctx);
    if (mem == nullptr) {
        return fail(err, err_size, "this context has no memory to save", -1);
    }
    const std::string final_path = path;
    const std::string tmp_path   = final_path + ".tmp";
    try {
        llama_synchronize(ctx);
        file_ptr f(std::fopen(tmp_path.c_str(), "wb"));
        if (!f) {
            throw std::runtime_error(sys_error("could not create", tmp_path));
        }
        checksum sum;
        state_writer out(f.get(), sum, tmp_path);
        out.write(STATE_MAGIC, sizeof(STATE_MAGIC));
        const uint32_t ver[2] = {STATE_VERSION, 0};
        out.write(ver, sizeof(ver));
        const uint64_t hl = head_len;
        out.write(&hl, sizeof(hl));
        out.write(head, head_len);
        const size_t before = out.n_bytes();
        mem->state_write(out);
        write_u64(f.get(), &sum, out.n_bytes() - before, tmp_path);
        write_u64(f.get(), nullptr, sum.digest(), tmp_path);
        if (std::fflush(f.get()) != 0) {
            throw std::runtime_error(sys_error("could not write", tmp_path));
        }
        FILE * raw = f.release();
        if (std::fclose(raw) != 0) {
            throw std::runtime_error(sys_error("could not write", tmp_path));
        }
        if (std::rename(tmp_path.c_str(), final_path.c_str()) != 0) {
            throw std::runtime_error(sys_error("could not rename the saved state to", final_path));
        }
    } catch (const std::exception & e) {
        std::remove(tmp_path.c_str());
        return fail(err, err_size, e.what(), -1);
    }
    return 0;
}

int32_t llama_infllm_state_load(llama_context * ctx, const char * path, char * err, size_t err_size) {
    if (ctx == nullptr || path == nullptr) {
        return fail(err, err_size, "invalid arguments", -1);
    }
    llama_memory_t mem = llama_get_memory(ctx);
    if (mem == nullptr) {
        return fail(err, err_size, "this context has no memory to load into", -1);
    }
    file_ptr f(std::fopen(path, "rb"));
    if (!f) {
        return fail(err, err_size, sys_error("could not open", path), -1);
    }
    // the frame and the checksum, before the memory is touched
    uint64_t payload_begin = 0;
    uint64_t payload_len   = 0;
    {
        if (std::fseek(f.get(), 0, SEEK_END) != 0) {
            return fail(err, err_size, sys_error("could not read", path), -1);
        }
        const long end = std::ftell(f.get());
        std::rewind(f.get());
        if (end < 0 || (uint64_t) end < STATE_FIXED + STATE_TRAILER) {
            return fail(err, err_size, "not a saved state (the file is too short)", -1);
        }
        const uint64_t size = (uint64_t) end;
        uint8_t fixed[STATE_FIXED];
        if (std::fread(fixed, 1, sizeof(fixed), f.get()) != sizeof(fixed) ||
            std::memcmp(fixed, STATE_MAGIC, sizeof(STATE_MAGIC)) != 0) {
            return fail(err, err_size, "not a saved state (wrong magic)", -1);
        }
        uint32_t version;
        uint64_t head_len;
        std::memcpy(&version, fixed + 8, 4);
        std::memcpy(&head_len, fixed + 16, 8);
        if (version != STATE_VERSION) {
            return fail(err, err_size, "saved state format version " + std::to_string(version) +
                        " is not supported (this build reads version " + std::to_string(STATE_VERSION) + ")", -1);
        }
        if (head_len > size - STATE_FIXED - STATE_TRAILER) {
            return fail(err, err_size, "the saved state is truncated or corrupted (header length)", -1);
        }
        payload_begin = STATE_FIXED + head_len;
        std::rewind(f.get());
        checksum sum;
        std::vector<uint8_t> buf(1 << 20);
        uint64_t left = size - 8;
        uint64_t trailer[2] = {0, 0};
        while (left > 0) {
            const size_t n = (size_t) std::min<uint64_t>(left, buf.size());
            if (std::fread(buf.data(), 1, n, f.get()) != n) {
                return fail(err, err_size, sys_error("could not read", path), -1);
            }
            sum.update(buf.data(), n);
            left -= n;
        }
        if (std::fread(&trailer[1], 1, 8, f.get()) != 8 || std::fseek(f.get(), (long) (size - 16), SEEK_SET) != 0 ||
            std::fread(&trailer[0], 1, 8, f.get()) != 8) {
            return fail(err, err_size, sys_error("could not read", path), -1);
        }
        if (trailer[1] != sum.digest()) {
            return fail(err, err_size, "the saved state is truncated or corrupted (checksum mismatch)", -1);
        }
        payload_len = trailer[0];
        if (payload_len != size - STATE_TRAILER - payload_begin) {
            return fail(err, err_size, "the saved state is corrupted (payload length)", -1);
        }
    }
    try {
        llama_synchronize(ctx);
        if (std::fseek(f.get(), (long) payload_begin, SEEK_SET) != 0) {
            throw std::runtime_error(sys_error("could not read", path));
        }
        state_reader in(f.get(), (size_t) payload_len);
        mem->state_read(in);
        if (in.remaining() != 0) {
            throw std::runtime_error("the saved state has " + std::to_string(in.remaining()) +
                                     " bytes more than this context's memory reads");
        }
    } catch (const std::exception & e) {
        llama_memory_clear(mem, true);
        return fail(err, err_size, e.what(), -2);
    }
    return 0;
}
