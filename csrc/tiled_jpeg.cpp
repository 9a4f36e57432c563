#include "tiled_jpeg.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#ifdef HEXFAST_HAVE_JPEG
#include <csetjmp>
#include <jpeglib.h>
#endif

namespace hexfast {

// ---------------------------------------------------------------- TIFF layout

namespace {

struct FileReader {
    int fd;
    bool big_endian = false;
    bool read(uint64_t offset, void* dst, size_t n) const {
        auto* p = static_cast<char*>(dst);
        while (n > 0) {
            const ssize_t got = ::pread(fd, p, n, static_cast<off_t>(offset));
            if (got <= 0) return false;
            p += got, offset += static_cast<uint64_t>(got), n -= static_cast<size_t>(got);
        }
        return true;
    }
    uint64_t to_host(const uint8_t* b, int bytes) const {
        uint64_t v = 0;
        for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(b[big_endian ? bytes - 1 - i : i]) << (8 * i);
        return v;
    }
};

int type_size(uint16_t type) {
    switch (type) {
        case 1: case 2: case 6: case 7: return 1;  // BYTE, ASCII, SBYTE, UNDEFINED
        case 3: case 8: return 2;                  // SHORT, SSHORT
        case 4: case 9: case 11: case 13: return 4;  // LONG, SLONG, FLOAT, IFD
        case 5: case 10: case 12: case 16: case 17: case 18: return 8;
        default: return 0;
    }
}

struct Entry {
    uint16_t type = 0;
    uint64_t count = 0;
    std::vector<uint8_t> bytes;  // raw value bytes, file byte order
};

}  // namespace

std::string parse_tiled_jpeg(const std::string& path, TiledJpegLayout& layout) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return "cannot open the file";
    struct Closer {
        int fd;
        ~Closer() { ::close(fd); }
    } closer{fd};
    FileReader f{fd};
    uint8_t head[16];
    if (!f.read(0, head, 8)) return "not a TIFF file";
    if (head[0] == 'M' && head[1] == 'M') f.big_endian = true;
    else if (!(head[0] == 'I' && head[1] == 'I')) return "not a TIFF file";
    const uint64_t magic = f.to_host(head + 2, 2);
    const bool big = magic == 43;
    if (magic != 42 && !big) return "not a TIFF file";
    uint64_t ifd = f.to_host(head + 4, 4);
    if (big) {
        if (!f.read(0, head, 16)) return "truncated BigTIFF header";
        ifd = f.to_host(head + 8, 8);
    }
    const int count_bytes = big ? 8 : 2, entry_bytes = big ? 20 : 12, inline_bytes = big ? 8 : 4;
    uint8_t nbuf[8];
    if (!f.read(ifd, nbuf, count_bytes)) return "truncated IFD";
    const uint64_t n_entries = f.to_host(nbuf, count_bytes);
    if (n_entries == 0 || n_entries > 4096) return "implausible IFD";
    std::vector<uint8_t> raw(n_entries * entry_bytes);
    if (!f.read(ifd + count_bytes, raw.data(), raw.size())) return "truncated IFD";

    std::unordered_map<uint16_t, Entry> tags;
    for (uint64_t i = 0; i < n_entries; ++i) {
        const uint8_t* e = raw.data() + i * entry_bytes;
        const auto tag = static_cast<uint16_t>(f.to_host(e, 2));
        Entry entry;
        entry.type = static_cast<uint16_t>(f.to_host(e + 2, 2));
        entry.count = f.to_host(e + 4, big ? 8 : 4);
        const int ts = type_size(entry.type);
        if (ts == 0 || entry.count > (1ull << 32)) continue;
        const uint64_t size = entry.count * ts;
        entry.bytes.resize(size);
        const uint8_t* value = e + (big ? 12 : 8);
        if (size <= static_cast<uint64_t>(inline_bytes)) std::memcpy(entry.bytes.data(), value, size);
        else if (!f.read(f.to_host(value, inline_bytes), entry.bytes.data(), size)) return "truncated tag data";
        tags.emplace(tag, std::move(entry));
    }
    auto values = [&](uint16_t tag) {
        std::vector<uint64_t> out;
        auto it = tags.find(tag);
        if (it == tags.end()) return out;
        const int ts = type_size(it->second.type);
        if (it->second.type != 3 && it->second.type != 4 && it->second.type != 16) return out;
        for (uint64_t i = 0; i < it->second.count; ++i) out.push_back(f.to_host(it->second.bytes.data() + i * ts, ts));
        return out;
    };
    auto scalar = [&](uint16_t tag, uint64_t fallback) {
        auto v = values(tag);
        return v.empty() ? fallback : v[0];
    };

    if (scalar(259, 1) != 7) return "level 0 is not JPEG-compressed";
    if (values(322).empty()) return "level 0 is not tiled";
    if (scalar(277, 1) != 3) return "level 0 does not have 3 samples per pixel";
    for (uint64_t bits : values(258))
        if (bits != 8) return "level 0 is not 8 bits per sample";
    if (scalar(284, 1) != 1) return "level 0 is not chunky (planar configuration 1)";
    const uint64_t photometric = scalar(262, 2);
    if (photometric != 2 && photometric != 6) return "level 0 is neither RGB nor YCbCr";
    layout.ycbcr = photometric == 6;
    layout.width = static_cast<int64_t>(scalar(256, 0));
    layout.height = static_cast<int64_t>(scalar(257, 0));
    layout.tile_w = static_cast<int64_t>(scalar(322, 0));
    layout.tile_h = static_cast<int64_t>(scalar(323, 0));
    if (layout.width <= 0 || layout.height <= 0 || layout.tile_w <= 0 || layout.tile_h <= 0 ||
        layout.tile_w > 8192 || layout.tile_h > 8192)
        return "implausible level-0 or tile size";
    layout.offsets = values(324);
    layout.byte_counts = values(325);
    const uint64_t expected = static_cast<uint64_t>(layout.tiles_across()) *
                              static_cast<uint64_t>((layout.height + layout.tile_h - 1) / layout.tile_h);
    if (layout.offsets.size() != expected || layout.byte_counts.size() != expected)
        return "tile offsets do not match the tile grid";
    auto tables = tags.find(347);
    if (tables != tags.end()) layout.tables = tables->second.bytes;
    return {};
}

// ------------------------------------------------------------------- cache

DecodedTile DecodedTileCache::get_or_claim(int64_t key) {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return !in_flight_.count(key); });
    auto it = index_.find(key);
    if (it == index_.end()) {
        in_flight_.insert(key);
        return nullptr;
    }
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->second;
}

void DecodedTileCache::fulfil(int64_t key, DecodedTile tile) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        in_flight_.erase(key);
        bytes_ += tile->size;
        lru_.emplace_front(key, std::move(tile));
        index_[key] = lru_.begin();
        while (bytes_ > capacity_ && lru_.size() > 1) {
            DecodedTile& old = lru_.back().second;
            bytes_ -= old->size;
            // Only the cache holds it (holders copy it under mu_): keep its memory for the next decode.
            if (old.use_count() == 1 && spare_.size() < 16 && (spare_.empty() || old->size == spare_bytes_)) {
                spare_bytes_ = old->size;
                spare_.push_back(std::move(std::const_pointer_cast<PixelBuffer>(old)->data));
            }
            index_.erase(lru_.back().first);
            lru_.pop_back();
        }
    }
    done_.notify_all();
}

std::shared_ptr<PixelBuffer> DecodedTileCache::buffer(size_t bytes) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (!spare_.empty() && spare_bytes_ == bytes) {
            auto out = std::make_shared<PixelBuffer>(std::move(spare_.back()), bytes);
            spare_.pop_back();
            return out;
        }
    }
    return std::make_shared<PixelBuffer>(bytes);
}

void DecodedTileCache::abandon(int64_t key) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        in_flight_.erase(key);
    }
    done_.notify_all();
}

// -------------------------------------------------------------------- JPEG

#ifdef HEXFAST_HAVE_JPEG
bool tiled_jpeg_available() { return true; }

class JpegDecoder {
public:
    JpegDecoder() {
        cinfo_.err = jpeg_std_error(&err_.pub);
        err_.pub.error_exit = [](j_common_ptr c) {
            auto* err = reinterpret_cast<ErrorManager*>(c->err);
            (*c->err->format_message)(c, err->message);
            std::longjmp(err->jump, 1);
        };
        err_.pub.output_message = [](j_common_ptr) {};  // warnings are tolerated, as OpenSlide does
        jpeg_create_decompress(&cinfo_);
    }
    ~JpegDecoder() { jpeg_destroy_decompress(&cinfo_); }

    // Decodes one stored tile (after the JPEGTables, when given) into rgb,
    // which must hold w x h x 3 bytes. Returns an error message, empty on success.
    std::string decode(const std::vector<uint8_t>& tables, bool ycbcr, const uint8_t* data, size_t n, int64_t w,
                       int64_t h, uint8_t* rgb) {
        rows_.resize(static_cast<size_t>(h));
        if (setjmp(err_.jump)) {
            jpeg_abort_decompress(&cinfo_);
            return std::string("JPEG: ") + err_.message;
        }
        if (!tables.empty()) {
            jpeg_mem_src(&cinfo_, const_cast<unsigned char*>(tables.data()), tables.size());
            jpeg_read_header(&cinfo_, FALSE);
        }
        jpeg_mem_src(&cinfo_, const_cast<unsigned char*>(data), n);
        jpeg_read_header(&cinfo_, TRUE);
        // The TIFF's photometric tag, not libjpeg's guess from JFIF/Adobe
        // markers or component ids, says whether the data is YCbCr (Aperio
        // writes RGB JPEGs without markers that say so): OpenSlide follows the
        // tag even where a marker disagrees (tested), and so does this reader.
        cinfo_.jpeg_color_space = ycbcr ? JCS_YCbCr : JCS_RGB;
        cinfo_.out_color_space = JCS_RGB;
        jpeg_start_decompress(&cinfo_);
        if (cinfo_.output_width != w || cinfo_.output_height != h || cinfo_.output_components != 3) {
            jpeg_abort_decompress(&cinfo_);
            return "JPEG tile is " + std::to_string(cinfo_.output_width) + "x" +
                   std::to_string(cinfo_.output_height) + ", the TIFF says " + std::to_string(w) + "x" +
                   std::to_string(h);
        }
        for (int64_t r = 0; r < h; ++r) rows_[r] = rgb + r * w * 3;
        while (cinfo_.output_scanline < cinfo_.output_height)
            jpeg_read_scanlines(&cinfo_, rows_.data() + cinfo_.output_scanline,
                                cinfo_.output_height - cinfo_.output_scanline);
        jpeg_finish_decompress(&cinfo_);
        return {};
    }

    // This worker's buffer for a stored tile's compressed bytes: grown, never
    // shrunk or zeroed, so reading a tile costs no allocation.
    uint8_t* compressed(size_t n) {
        if (n > compressed_size_) {
            compressed_.reset(new uint8_t[n]);
            compressed_size_ = n;
        }
        return compressed_.get();
    }

private:
    std::unique_ptr<uint8_t[]> compressed_;
    size_t compressed_size_ = 0;
    struct ErrorManager {
        jpeg_error_mgr pub;
        std::jmp_buf jump;
        char message[JMSG_LENGTH_MAX];
    };
    jpeg_decompress_struct cinfo_{};
    ErrorManager err_{};
    std::vector<JSAMPROW> rows_;
};
#else
bool tiled_jpeg_available() { return false; }

class JpegDecoder {
public:
    std::string decode(const std::vector<uint8_t>&, bool, const uint8_t*, size_t, int64_t, int64_t, uint8_t*) {
        return "hexfast was built without libjpeg";
    }
    uint8_t* compressed(size_t) { return nullptr; }
};
#endif

// ------------------------------------------------------------------ reader

TiledJpegReader::TiledJpegReader(const std::string& path, TiledJpegLayout layout, size_t cache_bytes)
    : layout_(std::move(layout)), cache_(cache_bytes) {
    if (!tiled_jpeg_available()) throw std::runtime_error("hexfast was built without libjpeg");
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error("cannot open the file");
    struct stat st {};
    if (::fstat(fd_, &st) == 0) file_size_ = static_cast<uint64_t>(st.st_size);
}

TiledJpegReader::~TiledJpegReader() {
    if (fd_ >= 0) ::close(fd_);
}

std::shared_ptr<JpegDecoder> TiledJpegReader::make_decoder() { return std::make_shared<JpegDecoder>(); }

std::string TiledJpegReader::tile(JpegDecoder& decoder, int64_t tx, int64_t ty, DecodedTile& out) {
    const int64_t key = ty * layout_.tiles_across() + tx;
    if ((out = cache_.get_or_claim(key))) return {};
    std::string err = decode(decoder, key, out);
    if (err.empty()) cache_.fulfil(key, out);
    else cache_.abandon(key);
    return err;
}

std::string TiledJpegReader::decode(JpegDecoder& decoder, int64_t key, DecodedTile& out) {
    const uint64_t offset = layout_.offsets[key], n = layout_.byte_counts[key];
    auto pixels = cache_.buffer(static_cast<size_t>(layout_.tile_w * layout_.tile_h * 3));
    if (n == 0) {  // sparse tile: nothing stored, transparent in OpenSlide, black after RGB conversion
        std::memset(pixels->data.get(), 0, pixels->size);
        out = pixels;
        return {};
    }
    if (offset + n > file_size_ || n > (256u << 20))
        return "stored tile " + std::to_string(key) + " lies beyond the end of the file";
    uint8_t* data = decoder.compressed(static_cast<size_t>(n));
    FileReader f{fd_};
    if (!f.read(offset, data, n)) return "cannot read stored tile " + std::to_string(key);
    std::string err = decoder.decode(layout_.tables, layout_.ycbcr, data, n, layout_.tile_w, layout_.tile_h,
                                     pixels->data.get());
    if (!err.empty()) return err;
    ++decoded_;
    out = pixels;
    return {};
}

std::string TiledJpegReader::read(JpegDecoder& decoder, int64_t x, int64_t y, int64_t size, uint8_t* rgb,
                                  const TileTransform* transform) {
    const int64_t x0 = std::max<int64_t>(x, 0), y0 = std::max<int64_t>(y, 0);
    const int64_t x1 = std::min(x + size, layout_.width), y1 = std::min(y + size, layout_.height);
    const bool edge = x0 > x || y0 > y || x1 < x + size || y1 < y + size;
    if (edge) std::memset(rgb, 0, static_cast<size_t>(size * size * 3));
    // Edge tiles are rare: their black border is transformed too, in place at the end.
    const bool per_row = transform != nullptr && !edge;
    const int64_t tw = layout_.tile_w, th = layout_.tile_h;
    for (int64_t ty = y0 / th; ty * th < y1; ++ty) {
        for (int64_t tx = x0 / tw; tx * tw < x1; ++tx) {
            DecodedTile t;
            std::string err = tile(decoder, tx, ty, t);
            if (!err.empty()) return err;
            // The part of the region inside this stored tile and the image.
            const int64_t cx0 = std::max(x0, tx * tw), cx1 = std::min(x1, (tx + 1) * tw);
            const int64_t cy0 = std::max(y0, ty * th), cy1 = std::min(y1, (ty + 1) * th);
            const size_t row_pixels = static_cast<size_t>(cx1 - cx0);
            for (int64_t r = cy0; r < cy1; ++r) {
                uint8_t* dst = rgb + ((r - y) * size + (cx0 - x)) * 3;
                const uint8_t* src = t->data.get() + ((r - ty * th) * tw + (cx0 - tx * tw)) * 3;
                if (per_row) (*transform)(src, dst, row_pixels);
                else std::memcpy(dst, src, row_pixels * 3);
            }
        }
    }
    if (transform != nullptr && edge) (*transform)(rgb, rgb, static_cast<size_t>(size * size));
    return {};
}

}  // namespace hexfast
