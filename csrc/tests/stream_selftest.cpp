// Exercises TileStream's threading under the sanitizers (TSan in .ci/run):
// full runs with several workers, early close, a consumer that releases
// batches from another thread, and read errors with and without skipping.
// Needs HEXFAST_OPENSLIDE_LIB (libopenslide.so.1) and HEXFAST_TEST_SLIDE
// (a readable slide); HEXFAST_BAD_SLIDE (unreadable.svs) is optional.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "tile_stream.hpp"

using namespace hexfast;

static int failures = 0;
#define CHECK(cond)                                                     \
    do {                                                                \
        if (!(cond)) {                                                  \
            std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            ++failures;                                                 \
        }                                                               \
    } while (0)

static StreamParams params(const char* lib, const char* slide, int n, int threads, int prefetch) {
    StreamParams p;
    p.library_path = lib;
    p.slide_path = slide;
    for (int i = 0; i < n; ++i) {
        p.coords.push_back((i % 17) * 100);
        p.coords.push_back((i / 17) * 100);
    }
    p.read_size = 112;
    p.out_size = 96;  // exercise the resizer too
    p.batch_size = 5;
    p.threads = threads;
    p.prefetch = prefetch;
    return p;
}

int main() {
    const char* lib = std::getenv("HEXFAST_OPENSLIDE_LIB");
    const char* slide = std::getenv("HEXFAST_TEST_SLIDE");
    if (!lib || !slide) {
        std::printf("stream_selftest: HEXFAST_OPENSLIDE_LIB and HEXFAST_TEST_SLIDE must be set\n");
        return 1;
    }
    // Whole stream, several workers: every tile once, in order.
    for (int threads : {1, 3}) {
        TileStream s(params(lib, slide, 203, threads, 3));
        int64_t seen = 0;
        for (Batch b = s.next(nullptr); b.slot >= 0; b = s.next(nullptr)) {
            CHECK(b.coords[0] == (seen % 17) * 100);
            seen += b.count;
            s.release(b.slot);
        }
        CHECK(seen == 203);
    }
    // Early close with batches in flight and workers waiting for buffers.
    {
        TileStream s(params(lib, slide, 400, 3, 2));
        Batch b = s.next(nullptr);
        CHECK(b.slot >= 0);
        s.close();
        s.release(b.slot);
    }
    // Batches released by another thread while the consumer keeps asking.
    {
        TileStream s(params(lib, slide, 150, 2, 2));
        std::vector<std::thread> releasers;
        int64_t seen = 0;
        for (Batch b = s.next(nullptr); b.slot >= 0; b = s.next(nullptr)) {
            seen += b.count;
            releasers.emplace_back([&s, slot = b.slot] { s.release(slot); });
            if (releasers.size() == 2) {
                for (auto& t : releasers) t.join();
                releasers.clear();
            }
        }
        for (auto& t : releasers) t.join();
        CHECK(seen == 150);
    }
    // Read errors: an error stops the stream; skipping reports every tile.
    if (const char* bad = std::getenv("HEXFAST_BAD_SLIDE")) {
        StreamParams p = params(lib, bad, 6, 2, 2);
        for (auto& c : p.coords) c = 0;
        p.read_size = 8;
        p.out_size = 8;
        {
            TileStream s(p);
            bool threw = false;
            try {
                for (Batch b = s.next(nullptr); b.slot >= 0; b = s.next(nullptr)) s.release(b.slot);
            } catch (const std::runtime_error&) {
                threw = true;
            }
            CHECK(threw);
        }
        p.skip_errors = true;
        TileStream s(p);
        CHECK(s.next(nullptr).slot < 0);
        CHECK(s.skipped().size() == 6);
    }
    std::printf("stream_selftest: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
