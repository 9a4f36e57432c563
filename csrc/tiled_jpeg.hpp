// Direct reading of level 0 of a JPEG-compressed tiled TIFF (Aperio SVS,
// generic tiled TIFF): the stored JPEG tiles are decoded with libjpeg(-turbo)
// into a shared, byte-bounded cache, so each stored tile is decoded about once
// although 224-px HEX tiles straddle up to four 240-px stored tiles.
// OpenSlide's read_region repaints every stored tile it touches for each
// request (~15 ns per pixel even when the tile is cached); this path copies
// rows out of decoded tiles instead. Pixels equal OpenSlide's (tested).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace hexfast {

// Colour transform of RGB pixels, run by the stream's workers (stain
// normalisation); src == dst (in place) is allowed. The direct reader applies
// it while copying rows out of decoded tiles, so a normalised tile costs no
// extra pass.
using TileTransform = std::function<void(const uint8_t* src, uint8_t* dst, size_t n_pixels)>;

// Whether the extension was built with libjpeg (CMake found it); without it
// only the OpenSlide path exists.
bool tiled_jpeg_available();

struct TiledJpegLayout {
    int64_t width = 0, height = 0;
    int64_t tile_w = 0, tile_h = 0;
    std::vector<uint64_t> offsets, byte_counts;  // row-major stored tiles
    std::vector<uint8_t> tables;                 // JPEGTables (abbreviated stream), may be empty
    bool ycbcr = false;                          // photometric YCbCr; RGB means the JPEG has no colour transform
    int64_t tiles_across() const { return (width + tile_w - 1) / tile_w; }
};

// Parses the first IFD of `path`. Returns an empty string when it is a layout
// this reader decodes (tiled, JPEG, 8-bit, 3 samples, chunky), else why not.
std::string parse_tiled_jpeg(const std::string& path, TiledJpegLayout& layout);

// tile_w x tile_h x 3 bytes; not zero-initialised (the decoder fills it).
struct PixelBuffer {
    explicit PixelBuffer(size_t n) : data(new uint8_t[n]), size(n) {}
    PixelBuffer(std::unique_ptr<uint8_t[]> reused, size_t n) : data(std::move(reused)), size(n) {}
    std::unique_ptr<uint8_t[]> data;
    size_t size;
};
using DecodedTile = std::shared_ptr<const PixelBuffer>;

// Least-recently-used decoded tiles, bounded in bytes; shared by the workers.
// A worker that misses claims the tile; others wanting it wait for that
// decode instead of repeating it (neighbouring tiles of the grid, read by
// different workers at the same moment, share stored tiles).
class DecodedTileCache {
public:
    explicit DecodedTileCache(size_t capacity_bytes) : capacity_(capacity_bytes) {}
    // The cached tile, or nullptr after claiming it: the caller must then
    // fulfil() or abandon() the claim.
    DecodedTile get_or_claim(int64_t key);
    void fulfil(int64_t key, DecodedTile tile);
    void abandon(int64_t key);  // decode failed: the next asker tries itself
    // A buffer of `bytes` for the next decode: an evicted tile's memory when
    // one is free (fresh pages cost page faults: ~14 % of a tile's time).
    std::shared_ptr<PixelBuffer> buffer(size_t bytes);

private:
    using Entry = std::pair<int64_t, DecodedTile>;
    std::mutex mu_;
    std::condition_variable done_;
    std::unordered_set<int64_t> in_flight_;
    size_t capacity_, bytes_ = 0;
    std::list<Entry> lru_;  // front: most recent
    std::unordered_map<int64_t, std::list<Entry>::iterator> index_;
    std::vector<std::unique_ptr<uint8_t[]>> spare_;  // memory of evicted tiles nobody holds
    size_t spare_bytes_ = 0;                         // size of each spare buffer
};

class JpegDecoder;  // one per worker thread (libjpeg state)

// Shared by the workers: the file, its layout and the decoded-tile cache.
class TiledJpegReader {
public:
    TiledJpegReader(const std::string& path, TiledJpegLayout layout, size_t cache_bytes);
    ~TiledJpegReader();
    TiledJpegReader(const TiledJpegReader&) = delete;
    TiledJpegReader& operator=(const TiledJpegReader&) = delete;

    // Level-0 region (x, y, size x size) into rgb (size^2 x 3). Pixels beyond
    // the image are black, as OpenSlide's transparent edge after RGB
    // conversion. With a transform, rgb gets the transformed pixels (applied
    // as rows are copied). Returns an error message, empty on success.
    std::string read(JpegDecoder& decoder, int64_t x, int64_t y, int64_t size, uint8_t* rgb,
                     const TileTransform* transform = nullptr);
    static std::shared_ptr<JpegDecoder> make_decoder();
    size_t decoded() const { return decoded_.load(); }  // stored tiles decoded so far (cache misses)  // shared_ptr: JpegDecoder stays opaque here

private:
    std::string tile(JpegDecoder& decoder, int64_t tx, int64_t ty, DecodedTile& out);
    std::string decode(JpegDecoder& decoder, int64_t key, DecodedTile& out);

    int fd_ = -1;
    uint64_t file_size_ = 0;
    TiledJpegLayout layout_;
    DecodedTileCache cache_;
    std::atomic<size_t> decoded_{0};
};

}  // namespace hexfast
