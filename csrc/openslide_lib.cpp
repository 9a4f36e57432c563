#include "openslide_lib.hpp"

#include <dlfcn.h>

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>

namespace hexfast {

namespace {
template <class F>
void bind(void* handle, const std::string& path, const char* name, F& fn) {
    void* sym = dlsym(handle, name);
    if (!sym) throw std::runtime_error(path + ": missing symbol " + name + " (OpenSlide 4 is required)");
    fn = reinterpret_cast<F>(sym);
}
}  // namespace

const OpenSlideLib& OpenSlideLib::load(const std::string& path) {
    static std::mutex mutex;
    static std::map<std::string, std::unique_ptr<OpenSlideLib>> loaded;  // never unloaded
    std::lock_guard<std::mutex> lock(mutex);
    auto& entry = loaded[path];
    if (entry) return *entry;
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        loaded.erase(path);
        throw std::runtime_error("cannot load OpenSlide from " + path + ": " + dlerror());
    }
    auto lib = std::make_unique<OpenSlideLib>();
    try {
        bind(handle, path, "openslide_open", lib->open);
        bind(handle, path, "openslide_close", lib->close);
        bind(handle, path, "openslide_get_error", lib->get_error);
        bind(handle, path, "openslide_read_region", lib->read_region);
        bind(handle, path, "openslide_get_property_value", lib->get_property_value);
        bind(handle, path, "openslide_cache_create", lib->cache_create);
        bind(handle, path, "openslide_set_cache", lib->set_cache);
        bind(handle, path, "openslide_cache_release", lib->cache_release);
    } catch (...) {
        loaded.erase(path);
        throw;
    }
    entry = std::move(lib);
    return *entry;
}

}  // namespace hexfast
