// TileStream: worker threads read, decode, (stain-normalise) and resize tiles
// into a bounded ring of preallocated batch buffers; the consumer takes whole
// batches in grid order and hands each buffer back when it is done with it.
//
// Memory is fixed at construction, whatever the slide size:
//   ring:    prefetch x batch x (out_size^2 x 3 + 16) bytes
//   workers: threads x read_size^2 x 7 bytes (+ resize scratch)
//   decoded-tile cache: cache_bytes (shared by the workers; OpenSlide's own
//   cache on the OpenSlide path, hexfast's on the direct-JPEG path)
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "openslide_lib.hpp"
#include "tiled_jpeg.hpp"

namespace hexfast {

struct StreamParams {
    std::string slide_path;
    std::string library_path;     // libopenslide.so.1
    std::vector<int64_t> coords;  // N x 2, level-0 top-left x, y
    int64_t read_size = 224;      // level-0 tile side
    int out_size = 224;           // output tile side (bilinear resize when different)
    int batch_size = 64;
    int threads = 2;
    int prefetch = 4;             // batches in the ring
    bool skip_errors = false;     // skip unreadable tiles (reported) instead of failing
    size_t cache_bytes = 64u << 20;
    // "auto": decode level 0's stored JPEG tiles directly when the file is a
    // JPEG-tiled TIFF (and hexfast has libjpeg), else OpenSlide's read_region.
    // "openslide" / "direct" force one (direct throws when it cannot).
    std::string reader = "auto";
    TileTransform transform;      // optional
};

// Thrown by next() when the `interrupted` callback asks to stop (Ctrl-C).
struct StreamInterrupted : std::runtime_error {
    StreamInterrupted() : std::runtime_error("interrupted") {}
};

struct SkippedTile {
    int64_t index, x, y;
    std::string message;
};

struct Batch {
    int slot = -1;       // ring slot to release when done; -1: end of stream
    int64_t* coords = nullptr;
    uint8_t* tiles = nullptr;
    int count = 0;
};

class TileStream {
public:
    explicit TileStream(StreamParams params);
    ~TileStream();
    TileStream(const TileStream&) = delete;
    TileStream& operator=(const TileStream&) = delete;

    // Waits for the next batch in grid order. Returns slot -1 at the end.
    // Throws std::runtime_error on a read error (naming the tile) or when the
    // consumer holds every buffer. `interrupted` is polled while waiting.
    Batch next(const std::function<bool()>& interrupted);
    void release(int slot);  // the consumer is done with this batch's buffers
    void close();            // stops and joins the workers; idempotent

    size_t size() const { return n_tiles_; }
    int out_size() const { return p_.out_size; }
    size_t batches() const { return n_batches_; }
    std::vector<SkippedTile> skipped() const;
    const char* reader() const { return direct_ ? "direct" : "openslide"; }
    size_t decoded_tiles() const { return direct_ ? direct_->decoded() : 0; }  // direct reader only

private:
    static constexpr size_t kRunLength = 16;  // tiles a worker takes at a time
    struct Slot {
        int64_t batch = -1;  // batch this slot is assigned to
        int count = 0, done = 0;
        bool ready = false, held = false;
        std::vector<int64_t> coords;
        std::vector<uint8_t> tiles;
        std::vector<int> bad;  // positions of skipped tiles
    };
    void worker();
    void assign(Slot& s, int64_t batch);
    void finish_slot(Slot& s);
    struct WorkerState;  // per-thread handles and scratch
    std::string read_tile(WorkerState& w, int64_t index, uint8_t* out);
    openslide_t* open_handle();
    void choose_reader(openslide_t* probe);

    StreamParams p_;
    const OpenSlideLib& lib_;
    openslide_cache_t* cache_ = nullptr;
    std::unique_ptr<TiledJpegReader> direct_;
    size_t n_tiles_, n_batches_;
    size_t tile_bytes_;
    std::unique_ptr<class BilinearResizer> resizer_;

    mutable std::mutex mu_;
    std::condition_variable slot_cv_, ready_cv_;
    std::vector<Slot> slots_;
    size_t next_tile_ = 0;
    int64_t next_batch_ = 0;
    bool stop_ = false;
    std::string error_;
    std::vector<SkippedTile> skipped_;
    std::vector<std::thread> workers_;
};

}  // namespace hexfast
