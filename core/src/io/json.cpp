#include "neva/io/json.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "neva/error.h"

namespace neva {

using nlohmann::json;

namespace {

// "path:LINE:COLUMN" of byte `offset` of `text` (1-based, columns in bytes); `text` starts on line
// `first_line` of the file.
std::string location(std::string_view text, const std::string& source, std::size_t offset, std::size_t first_line) {
  offset = std::min(offset, text.size());
  std::size_t line = first_line, line_start = 0;
  for (std::size_t i = 0; i < offset; ++i) {
    if (text[i] == '\n') {
      ++line;
      line_start = i + 1;
    }
  }
  return source + ":" + std::to_string(line) + ":" + std::to_string(offset - line_start + 1);
}

// nlohmann's parse_error text without its "[json.exception.parse_error.101] parse error at line 1,
// column 5: " preamble, which our location replaces.
std::string parse_error_reason(const json::parse_error& error) {
  std::string what = error.what();
  const std::size_t at = what.find(": ", what.find("parse error"));
  return at == std::string::npos ? what : what.substr(at + 2);
}

struct DepthExceeded {
  int depth;
};
struct DuplicateKey {
  std::string key;
};

json parse_at(std::string_view text, const std::string& source, const JsonLimits& limits, std::size_t first_line) {
  const std::string whole = first_line == 1 ? source : source + ":" + std::to_string(first_line);
  if (const std::size_t nul = text.find('\0'); nul != std::string_view::npos) {
    throw Error(location(text, source, nul, first_line) + ": invalid JSON: a NUL byte (JSON text cannot hold one; is this a "
                "binary file, or was it cut off and padded?)");
  }
  if (text.size() >= 3 && text.compare(0, 3, "\xEF\xBB\xBF") == 0) {
    throw Error(whole + ": invalid JSON: the text starts with a UTF-8 byte-order mark, which Python's json and "
                "transformers refuse too; save the file without it");
  }
  std::vector<std::set<std::string>> keys;  // one set per open object, for duplicate detection
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= limits.max_depth) {
      throw DepthExceeded{depth + 1};
    }
    if (limits.reject_duplicate_keys) {
      if (event == json::parse_event_t::object_start) keys.emplace_back();
      if (event == json::parse_event_t::object_end) keys.pop_back();
      if (event == json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second) {
        throw DuplicateKey{parsed.get<std::string>()};
      }
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), callback);
  } catch (const json::parse_error& error) {
    throw Error(location(text, source, error.byte == 0 ? 0 : error.byte - 1, first_line) + ": invalid JSON: " +
                parse_error_reason(error));
  } catch (const json::exception& error) {
    throw Error(whole + ": invalid JSON: " + json_error_reason(error));
  } catch (const DepthExceeded& deep) {
    throw Error(whole + ": invalid JSON: values nest deeper than " + std::to_string(limits.max_depth) +
                " levels (the limit; no real file of this kind nests this deep)");
  } catch (const DuplicateKey& duplicate) {
    throw Error(whole + ": invalid JSON: duplicate key '" + duplicate.key + "'");
  }
}

}  // namespace

json parse_json(std::string_view text, const std::string& source, const JsonLimits& limits) {
  return parse_at(text, source, limits, 1);
}

json parse_json_line(std::string_view line, const std::string& path, std::size_t line_number, const JsonLimits& limits) {
  return parse_at(line, path, limits, line_number);
}

namespace {

// Opens `path` for reading if it is a regular file: the check is made on the opened descriptor
// (O_NONBLOCK, so that opening a FIFO cannot block), not on the name before opening it.
int open_regular(const std::string& path, const char* what) {
  const std::string cannot = path + ": cannot open" + (*what ? std::string(" ") + what : std::string()) + ": ";
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error(cannot + std::strerror(errno));
  struct stat status {};
  if (::fstat(fd, &status) != 0 || !S_ISREG(status.st_mode)) {
    const bool directory = S_ISDIR(status.st_mode);
    ::close(fd);
    // Only regular files: a device, FIFO or directory (config = "/dev/zero") would read forever or fail
    // obscurely.
    throw Error(cannot + "not a regular file" + (directory ? " (a directory)" : ""));
  }
  return fd;
}

}  // namespace

std::string read_file(const std::string& path, const char* what) {
  const int fd = open_regular(path, what);
  std::string text;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int reason = errno;
      ::close(fd);
      throw Error(path + ": cannot read" + (*what ? std::string(" ") + what : std::string()) + ": " + std::strerror(reason));
    }
    if (got == 0) break;
    text.append(buffer, static_cast<std::size_t>(got));
  }
  ::close(fd);
  return text;
}

void check_regular_file(const std::string& path, const char* what) { ::close(open_regular(path, what)); }

void for_each_line(const std::string& path, const std::function<void(std::string_view, std::size_t)>& line) {
  check_regular_file(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open: " + std::strerror(errno));
  std::string text;
  for (std::size_t number = 1; std::getline(in, text); ++number) line(text, number);
  if (in.bad()) throw Error(path + ": cannot read: " + std::strerror(errno));
}

json read_json_file(const std::string& path, const JsonLimits& limits) {
  return parse_json(read_file(path), path, limits);
}

std::string json_error_reason(const json::exception& error) {
  const std::string what = error.what();
  if (what.rfind("[json.exception.", 0) == 0) {
    const std::size_t end = what.find("] ");
    if (end != std::string::npos) return what.substr(end + 2);
  }
  return what;
}

std::string json_excerpt(const json& value, std::size_t max_chars) {
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > max_chars) text = text.substr(0, max_chars - 3) + "...";
  return text;
}

}  // namespace neva
