#include "stain.hpp"
