// OpenSlide's C API, loaded at run time from the libopenslide.so.1 that the
// openslide-bin wheel ships (its path comes from Python). Only the few
// functions the streamer needs are declared here, from OpenSlide's documented API.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace hexfast {

struct openslide_t;
struct openslide_cache_t;

struct OpenSlideLib {
    openslide_t* (*open)(const char* filename) = nullptr;
    void (*close)(openslide_t* osr) = nullptr;
    const char* (*get_error)(openslide_t* osr) = nullptr;
    void (*read_region)(openslide_t* osr, uint32_t* dest, int64_t x, int64_t y, int32_t level, int64_t w,
                        int64_t h) = nullptr;
    const char* (*get_property_value)(openslide_t* osr, const char* name) = nullptr;
    openslide_cache_t* (*cache_create)(size_t capacity) = nullptr;
    void (*set_cache)(openslide_t* osr, openslide_cache_t* cache) = nullptr;
    void (*cache_release)(openslide_cache_t* cache) = nullptr;

    // Loads the library once per path; throws std::runtime_error naming the path on failure.
    static const OpenSlideLib& load(const std::string& path);
};

}  // namespace hexfast
