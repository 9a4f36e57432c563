#include "tile_stream.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "resize.hpp"

namespace hexfast {

namespace {
// OpenSlide gives premultiplied ARGB. Undo the premultiplication the way
// openslide-python does, then drop alpha: what the reference's
// `read_region(...).convert("RGB")` sees, so pixels beyond the slide are black.
void argb_to_rgb(const uint32_t* argb, uint8_t* rgb, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        const uint32_t px = argb[i];
        const uint32_t a = px >> 24;
        uint32_t r = (px >> 16) & 0xff, g = (px >> 8) & 0xff, b = px & 0xff;
        if (a == 0) {
            r = g = b = 0;
        } else if (a != 255) {
            r = (r * 255 + a / 2) / a;
            g = (g * 255 + a / 2) / a;
            b = (b * 255 + a / 2) / a;
        }
        rgb[3 * i] = static_cast<uint8_t>(std::min<uint32_t>(r, 255));
        rgb[3 * i + 1] = static_cast<uint8_t>(std::min<uint32_t>(g, 255));
        rgb[3 * i + 2] = static_cast<uint8_t>(std::min<uint32_t>(b, 255));
    }
}
}  // namespace

TileStream::TileStream(StreamParams params)
    : p_(std::move(params)), lib_(OpenSlideLib::load(p_.library_path)) {
    if (p_.coords.size() % 2) throw std::invalid_argument("coords must be N x 2");
    if (p_.read_size <= 0 || p_.out_size <= 0) throw std::invalid_argument("tile sizes must be positive");
    if (p_.batch_size <= 0 || p_.threads <= 0 || p_.prefetch <= 0)
        throw std::invalid_argument("batch_size, threads and prefetch must be positive");
    n_tiles_ = p_.coords.size() / 2;
    n_batches_ = (n_tiles_ + p_.batch_size - 1) / p_.batch_size;
    tile_bytes_ = static_cast<size_t>(p_.out_size) * p_.out_size * 3;
    if (p_.out_size != p_.read_size)
        resizer_ = std::make_unique<BilinearResizer>(static_cast<int>(p_.read_size), p_.out_size);

    if (p_.reader != "auto" && p_.reader != "openslide" && p_.reader != "direct")
        throw std::invalid_argument("reader must be auto, openslide or direct, not " + p_.reader);
    openslide_t* probe = open_handle();  // fail here, in the caller's thread, if the slide cannot be opened
    try {
        choose_reader(probe);
    } catch (...) {
        lib_.close(probe);
        throw;
    }
    lib_.close(probe);
    if (!direct_) cache_ = lib_.cache_create(p_.cache_bytes);

    slots_.resize(std::min<size_t>(p_.prefetch, std::max<size_t>(n_batches_, 1)));
    for (size_t k = 0; k < slots_.size(); ++k) {
        slots_[k].coords.resize(static_cast<size_t>(p_.batch_size) * 2);
        slots_[k].tiles.resize(static_cast<size_t>(p_.batch_size) * tile_bytes_);
        assign(slots_[k], static_cast<int64_t>(k));
    }
    const int n_workers = static_cast<int>(std::min<size_t>(p_.threads, std::max<size_t>(n_tiles_, 1)));
    for (int t = 0; t < n_workers; ++t) workers_.emplace_back([this] { worker(); });
}

TileStream::~TileStream() { close(); }

void TileStream::choose_reader(openslide_t* probe) {
    if (p_.reader == "openslide") return;
    TiledJpegLayout layout;
    std::string why = tiled_jpeg_available() ? parse_tiled_jpeg(p_.slide_path, layout)
                                             : std::string("hexfast was built without libjpeg");
    if (why.empty()) {  // the first IFD must be what OpenSlide calls level 0
        const char* w = lib_.get_property_value(probe, "openslide.level[0].width");
        const char* h = lib_.get_property_value(probe, "openslide.level[0].height");
        if (!w || !h || std::to_string(layout.width) != w || std::to_string(layout.height) != h)
            why = "the first TIFF directory is not OpenSlide's level 0";
    }
    if (why.empty()) direct_ = std::make_unique<TiledJpegReader>(p_.slide_path, std::move(layout), p_.cache_bytes);
    else if (p_.reader == "direct") throw std::runtime_error("cannot decode this slide's tiles directly: " + why);
}

openslide_t* TileStream::open_handle() {
    openslide_t* osr = lib_.open(p_.slide_path.c_str());
    if (!osr) throw std::runtime_error("not a slide OpenSlide can open");
    if (const char* err = lib_.get_error(osr)) {
        std::string msg = err;
        lib_.close(osr);
        throw std::runtime_error("cannot open slide: " + msg);
    }
    if (cache_) lib_.set_cache(osr, cache_);
    return osr;
}

void TileStream::assign(Slot& s, int64_t batch) {
    s.batch = batch < static_cast<int64_t>(n_batches_) ? batch : -1;
    s.count = s.batch < 0 ? 0
                          : static_cast<int>(std::min<size_t>(p_.batch_size, n_tiles_ - batch * p_.batch_size));
    s.done = 0;
    s.ready = false;
    s.bad.clear();
}

void TileStream::finish_slot(Slot& s) {
    // Compact away skipped tiles, then record the coordinates of the rest.
    std::sort(s.bad.begin(), s.bad.end());
    int out = 0;
    for (int pos = 0, b = 0; pos < s.count; ++pos) {
        if (b < static_cast<int>(s.bad.size()) && s.bad[b] == pos) {
            ++b;
            continue;
        }
        const size_t index = static_cast<size_t>(s.batch) * p_.batch_size + pos;
        if (out != pos)
            std::memmove(s.tiles.data() + out * tile_bytes_, s.tiles.data() + pos * tile_bytes_, tile_bytes_);
        s.coords[2 * out] = p_.coords[2 * index];
        s.coords[2 * out + 1] = p_.coords[2 * index + 1];
        ++out;
    }
    s.count = out;
    s.ready = true;
    ready_cv_.notify_all();
}

struct TileStream::WorkerState {
    openslide_t* osr = nullptr;
    std::shared_ptr<JpegDecoder> jpeg;
    std::vector<uint32_t> argb;
    std::vector<uint8_t> rgb, scratch;
};

std::string TileStream::read_tile(WorkerState& w, int64_t index, uint8_t* out) {
    const int64_t rs = p_.read_size, x = p_.coords[2 * index], y = p_.coords[2 * index + 1];
    const size_t n = static_cast<size_t>(rs) * rs;
    uint8_t* pixels = resizer_ ? w.rgb.data() : out;
    if (direct_) {  // transformed while the rows are copied out of the decoded tiles
        std::string err = direct_->read(*w.jpeg, x, y, rs, pixels, p_.transform ? &p_.transform : nullptr);
        if (!err.empty()) return err;
    } else {
        try {
            if (!w.osr) w.osr = open_handle();
        } catch (const std::exception& e) {
            return e.what();
        }
        lib_.read_region(w.osr, w.argb.data(), x, y, 0, rs, rs);
        if (const char* err = lib_.get_error(w.osr)) {
            std::string msg = err;
            lib_.close(w.osr);  // an OpenSlide handle stays in error once it fails: reopen for the next tile
            w.osr = nullptr;
            return msg;
        }
        argb_to_rgb(w.argb.data(), pixels, n);
        if (p_.transform) p_.transform(pixels, pixels, n);
    }
    if (resizer_) (*resizer_)(pixels, out, w.scratch);
    return {};
}

void TileStream::worker() {
    const size_t n = static_cast<size_t>(p_.read_size) * p_.read_size;
    WorkerState w;
    if (direct_) w.jpeg = TiledJpegReader::make_decoder();
    else w.argb.resize(n);
    if (resizer_) w.rgb.resize(n * 3);
    for (;;) {
        size_t first, last;
        Slot* s;
        {
            std::unique_lock<std::mutex> lock(mu_);
            if (stop_ || next_tile_ >= n_tiles_) break;
            // A run of consecutive tiles (within one batch): neighbouring grid
            // tiles share stored tiles, so workers on separate runs rarely wait
            // for each other's decodes.
            first = next_tile_;
            const int64_t batch = static_cast<int64_t>(first / p_.batch_size);
            const size_t batch_end = std::min(n_tiles_, static_cast<size_t>(batch + 1) * p_.batch_size);
            last = std::min(batch_end, first + kRunLength);
            next_tile_ = last;
            s = &slots_[batch % slots_.size()];
            slot_cv_.wait(lock, [&] { return stop_ || s->batch == batch; });
            if (stop_) break;
        }
        bool failed = false;
        for (size_t index = first; index < last && !failed; ++index) {
            const int pos = static_cast<int>(index % p_.batch_size);
            std::string err = read_tile(w, static_cast<int64_t>(index), s->tiles.data() + pos * tile_bytes_);
            std::lock_guard<std::mutex> lock(mu_);
            if (stop_) {
                failed = true;
                break;
            }
            if (!err.empty()) {
                const int64_t x = p_.coords[2 * index], y = p_.coords[2 * index + 1];
                if (!p_.skip_errors) {
                    if (error_.empty())
                        error_ = "tile " + std::to_string(index) + " at level-0 (" + std::to_string(x) + ", " +
                                 std::to_string(y) + "): " + err;
                    stop_ = true;
                    ready_cv_.notify_all();
                    slot_cv_.notify_all();
                    failed = true;
                    break;
                }
                s->bad.push_back(pos);
                skipped_.push_back({static_cast<int64_t>(index), x, y, err});
            }
            if (++s->done == s->count) finish_slot(*s);
        }
        if (failed) break;
    }
    if (w.osr) lib_.close(w.osr);
}

Batch TileStream::next(const std::function<bool()>& interrupted) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
        if (!error_.empty()) throw std::runtime_error(error_);
        if (next_batch_ >= static_cast<int64_t>(n_batches_)) return {};
        const int slot = static_cast<int>(next_batch_ % slots_.size());
        Slot& s = slots_[slot];
        if (s.batch == next_batch_ && s.ready) {
            ++next_batch_;
            if (s.count == 0) {  // every tile of it was skipped
                assign(s, s.batch + static_cast<int64_t>(slots_.size()));
                slot_cv_.notify_all();
                continue;
            }
            s.held = true;
            return {slot, s.coords.data(), s.tiles.data(), s.count};
        }
        if (s.held)
            throw std::runtime_error("all " + std::to_string(slots_.size()) +
                                     " batch buffers are held by the consumer; copy the batches you keep "
                                     "(np.array(tiles)) or raise prefetch");
        if (stop_) throw std::runtime_error("stream closed");
        ready_cv_.wait_for(lock, std::chrono::milliseconds(50));
        lock.unlock();  // never hold mu_ while the callback takes the GIL
        const bool stop_now = interrupted && interrupted();
        lock.lock();
        if (stop_now) {
            stop_ = true;
            slot_cv_.notify_all();
            throw StreamInterrupted();
        }
    }
}

void TileStream::release(int slot) {
    std::lock_guard<std::mutex> lock(mu_);
    Slot& s = slots_.at(slot);
    s.held = false;
    assign(s, s.batch + static_cast<int64_t>(slots_.size()));
    slot_cv_.notify_all();
}

void TileStream::close() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
    }
    slot_cv_.notify_all();
    ready_cv_.notify_all();
    for (auto& t : workers_)
        if (t.joinable()) t.join();
    workers_.clear();
    if (cache_) {
        lib_.cache_release(cache_);
        cache_ = nullptr;
    }
}

std::vector<SkippedTile> TileStream::skipped() const {
    std::lock_guard<std::mutex> lock(mu_);
    return skipped_;
}

}  // namespace hexfast
