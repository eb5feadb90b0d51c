// neva-run serve: HTTP/1.1 on Boost.Beast (one network thread), the engine on its own thread, image
// decoding on a worker thread; JSON by nlohmann, metrics by prometheus-cpp.
#include <sys/socket.h>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <array>
#include <atomic>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>

#include "../session.h"
#include "engine.h"
#include "neva/error.h"
#include "protocol.h"
#include "serve.h"

namespace neva {

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using nlohmann::json;
using serve::ApiError;
using serve::Clock;

std::string sha256(const std::string& text) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(text.data(), text.size(), digest, &size, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(digest), size);
}

// A file's bytes, refused beyond `limit` bytes or unreadable (naming `where`).
std::string read_limited(const std::string& path, std::size_t limit, const std::string& where) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ApiError(400, where + ": cannot read " + path, "messages", "invalid_image");
  std::string bytes(limit + 1, '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  bytes.resize(static_cast<std::size_t>(in.gcount()));
  if (bytes.size() > limit) {
    throw ApiError(400, where + ": larger than " + std::to_string(limit) + " bytes", "messages", "invalid_image");
  }
  return bytes;
}

std::string random_id(const char* prefix) {
  static thread_local std::mt19937_64 generator{std::random_device{}()};
  static const char* hex = "0123456789abcdef";
  std::string id = prefix;
  for (int i = 0; i < 24; ++i) id.push_back(hex[generator() % 16]);
  return id;
}

struct Metrics {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  prometheus::Family<prometheus::Counter>& requests = prometheus::BuildCounter()
                                                          .Name("neva_requests_total")
                                                          .Help("HTTP requests answered, by endpoint and status")
                                                          .Register(*registry);
  serve::EngineMetrics engine;
  prometheus::Gauge* slots_total = nullptr;

  Metrics() {
    engine.queue_depth = &prometheus::BuildGauge()
                              .Name("neva_queue_depth")
                              .Help("Requests waiting for a slot")
                              .Register(*registry)
                              .Add({});
    engine.slots_busy = &prometheus::BuildGauge()
                             .Name("neva_slots_busy")
                             .Help("Slots decoding a request")
                             .Register(*registry)
                             .Add({});
    slots_total = &prometheus::BuildGauge().Name("neva_slots").Help("Slots (serve.parallel)").Register(*registry).Add({});
    engine.prompt_tokens = &prometheus::BuildCounter()
                                .Name("neva_prompt_tokens_total")
                                .Help("Prompt tokens prefilled (image tokens included)")
                                .Register(*registry)
                                .Add({});
    engine.completion_tokens = &prometheus::BuildCounter()
                                    .Name("neva_completion_tokens_total")
                                    .Help("Tokens generated")
                                    .Register(*registry)
                                    .Add({});
    engine.time_to_first_token =
        &prometheus::BuildHistogram()
             .Name("neva_time_to_first_token_seconds")
             .Help("From a request's arrival in the queue to its first generated token")
             .Register(*registry)
             .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60});
    engine.time_per_output_token =
        &prometheus::BuildHistogram()
             .Name("neva_time_per_output_token_seconds")
             .Help("Mean time between a request's generated tokens after the first")
             .Register(*registry)
             .Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5});
    engine.step_seconds = &prometheus::BuildHistogram()
                               .Name("neva_decode_step_seconds")
                               .Help("One batched decoding step over the busy slots")
                               .Register(*registry)
                               .Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                               0.1, 0.25, 0.5, 1, 2.5});
  }
};

class Server;

// One client connection: reads requests (with a deadline for headers and body), answers them, and
// streams completions as server-sent events.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, Server& server);
  ~Connection();
  void start() { read_request(); }

 private:
  void read_request();
  void read_body();
  void on_read(beast::error_code error);
  void handle(http::request<http::string_body> request);
  void handle_completion(const http::request<http::string_body>& request, bool chat);
  void submit(serve::ParsedRequest parsed);
  void on_event(serve::JobEvent event);
  void watch_disconnect();
  void send_error(const ApiError& error);
  void send_json(int status, const json& body, const std::string& extra_header = "", const std::string& extra_value = "");
  void send(std::shared_ptr<http::response<http::string_body>> response);
  void start_stream();
  void stream_event(const json& data);
  void stream_raw(std::string payload, bool last);
  void write_next_chunk();
  void finish_response();
  void close();
  void linger();
  void drain_input(std::shared_ptr<std::array<char, 65536>> discard);
  void end_in_flight();
  void count(int status);

  beast::tcp_stream stream_;
  Server& server_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  net::steady_timer read_timer_;
  bool timed_out_ = false, keep_alive_ = false, closed_ = false;
  bool linger_ = false;  // the client may still be sending a refused body: drain it before closing
  std::uint64_t reading_ = 0;  // the read in progress (a timer firing for an earlier one does nothing)
  bool read_pending_ = false;
  std::string endpoint_;
  // The request being answered.
  std::shared_ptr<serve::Job> job_;
  bool chat_ = true, stream_mode_ = false, include_usage_ = false, logprobs_ = false, headers_sent_ = false;
  bool in_flight_ = false;
  serve::Completion completion_;
  // Stream chunks waiting to be written, and whether the last one is among them.
  std::deque<std::shared_ptr<std::string>> chunks_;
  bool writing_ = false, last_queued_ = false;
  std::shared_ptr<http::response<http::empty_body>> stream_header_;
  std::shared_ptr<http::response_serializer<http::empty_body>> stream_serializer_;
};

class Server {
 public:
  Server(Session& session, const Recipe& recipe, const ServeOptions& options)
      : session_(session),
        recipe_(recipe),
        acceptor_(io_),
        signals_(io_, SIGTERM, SIGINT),
        shutdown_timer_(io_),
        accept_timer_(io_),
        workers_(1) {
    const ServeConfig& config = recipe.serve;
    if (!options.api_key.empty()) api_key_digest_ = sha256(options.api_key);
    const std::int64_t model_context = session.model().backbone().max_position_embeddings();
    context_ = config.context_length > 0 ? std::min(config.context_length, model_context) : model_context;
    limits_.model_name = config.model_name;
    if (limits_.model_name.empty()) limits_.model_name = std::filesystem::path(recipe.source).stem().string();
    limits_.max_tokens = config.max_tokens > 0 ? config.max_tokens : recipe.inference.tokens_to_generate;
    limits_.max_tokens = std::min(limits_.max_tokens, context_ - 1);
    limits_.allowed_image_dir = config.allowed_image_dir;
    limits_.max_image_bytes = static_cast<std::size_t>(config.max_body_bytes);
    limits_.has_vision = session.model().encoder() != nullptr;
    defaults_ = session.sampling();
    metrics_.slots_total->Set(static_cast<double>(config.parallel));
    engine_ = std::make_unique<serve::Engine>(session, config.parallel, context_,
                                              static_cast<std::size_t>(config.max_queue), metrics_.engine);
  }

  int run() {
    const ServeConfig& config = recipe_.serve;
    beast::error_code error;
    const auto address = net::ip::make_address(config.host, error);
    if (error) throw RecipeError(recipe_.source + ": serve.host = \"" + config.host + "\" is not an IP address");
    const tcp::endpoint endpoint(address, static_cast<unsigned short>(config.port));
    acceptor_.open(endpoint.protocol());
    acceptor_.set_option(net::socket_base::reuse_address(true));
    acceptor_.bind(endpoint, error);
    if (error) {
      throw Error("cannot listen on " + config.host + ":" + std::to_string(config.port) + ": " + error.message() +
                  " (serve.port / --port)");
    }
    acceptor_.listen();
    std::cout << "neva-run serve: " << limits_.model_name << " on http://" << config.host << ":"
              << acceptor_.local_endpoint().port() << " (" << config.parallel << " slots of " << context_
              << " tokens, queue " << config.max_queue << ")" << std::endl;
    accept();
    signals_.async_wait([this](beast::error_code code, int signal) {
      if (!code) begin_shutdown(signal);
    });
    io_.run();
    engine_->abort("the server stopped");
    engine_->join();
    workers_.join();
    return 0;
  }

  // Everything the connections need.
  Session& session() { return session_; }
  serve::Engine& engine() { return *engine_; }
  net::io_context& io() { return io_; }
  net::thread_pool& workers() { return workers_; }
  Metrics& metrics() { return metrics_; }
  const serve::Limits& limits() const { return limits_; }
  const SamplingConfig& defaults() const { return defaults_; }
  const ServeConfig& config() const { return recipe_.serve; }
  std::int64_t context() const { return context_; }
  bool draining() const { return draining_; }
  bool authorised(const std::string& header) const {
    if (api_key_digest_.empty()) return true;
    const std::string prefix = "Bearer ";
    if (header.compare(0, prefix.size(), prefix) != 0) return false;
    // Digests of equal length compared in constant time: neither the key's bytes nor its length leak.
    const std::string digest = sha256(header.substr(prefix.size()));
    return CRYPTO_memcmp(digest.data(), api_key_digest_.data(), digest.size()) == 0;
  }
  void request_started() { ++in_flight_; }
  std::atomic<std::int64_t>& connections() { return connections_; }
  void request_finished() {
    --in_flight_;
    maybe_stop();
  }

 private:
  void accept() {
    acceptor_.async_accept(net::make_strand(io_), [this](beast::error_code error, tcp::socket socket) {
      if (error) {
        if (error == net::error::operation_aborted || !acceptor_.is_open()) return;
        // Out of file descriptors (or another transient failure): try again shortly, not at once.
        accept_timer_.expires_after(std::chrono::milliseconds(100));
        accept_timer_.async_wait([this](beast::error_code code) {
          if (!code && acceptor_.is_open()) accept();
        });
        return;
      }
      if (connections_.load() >= config().max_connections) {
        refuse(std::move(socket));
      } else {
        std::make_shared<Connection>(std::move(socket), *this)->start();
      }
      accept();
    });
  }

  // Beyond serve.max_connections: one canned 503 and the connection closed, nothing read.
  void refuse(tcp::socket socket) {
    const std::string body = serve::error_body("too many open connections (serve.max_connections = " +
                                                   std::to_string(config().max_connections) + "); retry later",
                                               "server_error", "", "too_many_connections")
                                 .dump();
    auto reply = std::make_shared<std::string>("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                               "Retry-After: 1\r\nConnection: close\r\nContent-Length: " +
                                               std::to_string(body.size()) + "\r\n\r\n" + body);
    auto held = std::make_shared<tcp::socket>(std::move(socket));
    metrics_.requests.Add({{"endpoint", "other"}, {"status", "503"}}).Increment();
    net::async_write(*held, net::buffer(*reply), [held, reply](beast::error_code, std::size_t) {
      beast::error_code ignored;
      held->shutdown(tcp::socket::shutdown_send, ignored);
      held->close(ignored);
    });
  }

  // SIGTERM / SIGINT: no new connections or requests; running ones finish within shutdown_timeout,
  // then whatever is left is ended with an error and the process exits 0.
  void begin_shutdown(int signal) {
    std::cout << "neva-run serve: " << (signal == SIGINT ? "SIGINT" : "SIGTERM") << ": finishing "
              << engine_->busy() + engine_->queued() << " request(s), then exiting" << std::endl;
    draining_ = true;
    beast::error_code ignored;
    acceptor_.close(ignored);
    engine_->drain();
    shutdown_timer_.expires_after(std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::duration<double>(config().shutdown_timeout)));
    shutdown_timer_.async_wait([this](beast::error_code error) {
      if (error) return;
      engine_->abort("the server is shutting down (serve.shutdown_timeout passed)");
      // Give the last responses a moment to leave.
      shutdown_timer_.expires_after(std::chrono::seconds(2));
      shutdown_timer_.async_wait([this](beast::error_code) { io_.stop(); });
    });
    maybe_stop();
  }
  void maybe_stop() {
    if (draining_ && in_flight_ == 0) io_.stop();
  }

  Session& session_;
  const Recipe& recipe_;
  // Connections alive (one may end on the engine thread); declared before io_, whose destruction
  // ends the last of them.
  std::atomic<std::int64_t> connections_{0};
  net::io_context io_{1};
  tcp::acceptor acceptor_;
  net::signal_set signals_;
  net::steady_timer shutdown_timer_;
  net::steady_timer accept_timer_;
  net::thread_pool workers_;
  Metrics metrics_;
  serve::Limits limits_;
  SamplingConfig defaults_;
  std::int64_t context_ = 0;
  std::string api_key_digest_;
  bool draining_ = false;
  std::int64_t in_flight_ = 0;  // requests submitted and not yet answered in full
  std::unique_ptr<serve::Engine> engine_;
};

Connection::Connection(tcp::socket socket, Server& server)
    : stream_(std::move(socket)), server_(server), read_timer_(stream_.get_executor()) {
  server_.connections().fetch_add(1);
}

Connection::~Connection() { server_.connections().fetch_sub(1); }

void Connection::read_request() {
  parser_.emplace();
  parser_->body_limit(static_cast<std::uint64_t>(server_.config().max_body_bytes));
  parser_->header_limit(64 * 1024);
  timed_out_ = false;
  read_pending_ = true;
  const std::uint64_t generation = ++reading_;
  // Headers and body within read_timeout (slow clients are answered 408 and closed), by a timer of our
  // own so that the 408 can still be written.
  read_timer_.expires_after(std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::duration<double>(server_.config().read_timeout)));
  read_timer_.async_wait([self = shared_from_this(), generation](beast::error_code error) {
    if (error || !self->read_pending_ || self->reading_ != generation) return;
    self->timed_out_ = true;
    beast::error_code ignored;
    self->stream_.socket().cancel(ignored);
  });
  http::async_read_header(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code error, std::size_t) {
    if (error) return self->on_read(error);
    // curl and others wait (a second) for "100 Continue" before sending a body over 1 KiB.
    const auto& request = self->parser_->get();
    if (beast::iequals(request[http::field::expect], "100-continue") && !self->parser_->is_done()) {
      // Not invited to send a body that would be refused unread.
      if (request.target().starts_with("/v1") &&
          !self->server_.authorised(std::string(request[http::field::authorization]))) {
        self->read_timer_.cancel();
        self->read_pending_ = false;
        self->endpoint_ = "other";
        self->keep_alive_ = false;
        self->linger_ = true;
        self->send_error(ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)", "",
                                  "invalid_api_key", "authentication_error"));
        return;
      }
      auto reply = std::make_shared<http::response<http::empty_body>>(http::status::continue_, request.version());
      http::async_write(self->stream_, *reply, [self, reply](beast::error_code error, std::size_t) {
        if (error) return self->on_read(error);
        self->read_body();
      });
      return;
    }
    self->read_body();
  });
}

void Connection::read_body() {
  http::async_read(stream_, buffer_, *parser_,
                   [self = shared_from_this()](beast::error_code error, std::size_t) { self->on_read(error); });
}

void Connection::on_read(beast::error_code error) {
  read_timer_.cancel();
  read_pending_ = false;
  endpoint_ = "other";
  keep_alive_ = false;
  if (timed_out_) {
    if (parser_->got_some()) {
      linger_ = true;
      send_error(ApiError(408, "the request was not received within " + json(server_.config().read_timeout).dump() +
                                   " s (serve.read_timeout)", "", "request_timeout"));
    } else {
      close();  // an idle keep-alive connection
    }
    return;
  }
  if (error == http::error::end_of_stream || error == net::error::eof || error == net::error::connection_reset) {
    close();
    return;
  }
  if (error == http::error::body_limit) {
    linger_ = true;
    send_error(ApiError(413, "the request body is larger than " + std::to_string(server_.config().max_body_bytes) +
                                 " bytes (serve.max_body_bytes)", "", "request_too_large"));
    return;
  }
  if (error == http::error::header_limit) {
    send_error(ApiError(431, "the request's headers are larger than 64 KiB", "", "headers_too_large"));
    return;
  }
  if (error) {
    if (!parser_->got_some()) {
      close();
      return;
    }
    send_error(ApiError(400, "malformed HTTP request: " + error.message(), "", "bad_http"));
    return;
  }
  handle(parser_->release());
}

void Connection::handle(http::request<http::string_body> request) {
  keep_alive_ = request.keep_alive();
  std::string target(request.target());
  if (auto query = target.find('?'); query != std::string::npos) target.resize(query);
  const bool get = request.method() == http::verb::get, post = request.method() == http::verb::post;
  try {
    if (target == "/health") {
      endpoint_ = "/health";
      if (!get) throw ApiError(405, "use GET " + target, "", "method_not_allowed");
      if (server_.draining()) {
        send_json(503, {{"status", "shutting down"}});
        return;
      }
      send_json(200, {{"status", "ok"},
                      {"slots", server_.config().parallel},
                      {"slots_busy", server_.engine().busy()},
                      {"queue", server_.engine().queued()}});
      return;
    }
    if (target == "/metrics") {
      endpoint_ = "/metrics";
      if (!get) throw ApiError(405, "use GET " + target, "", "method_not_allowed");
      auto response = std::make_shared<http::response<http::string_body>>(http::status::ok, request.version());
      response->set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      response->body() = prometheus::TextSerializer().Serialize(server_.metrics().registry->Collect());
      count(200);
      send(response);
      return;
    }
    const bool chat = target == "/v1/chat/completions", completion = target == "/v1/completions";
    const bool models = target == "/v1/models" || target == "/v1/models/" + server_.limits().model_name;
    if (!chat && !completion && !models) {
      endpoint_ = "unknown";
      throw ApiError(404, "no such endpoint: " + std::string(request.method_string()) + " " + target +
                              " (this server has /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)",
                     "", "not_found");
    }
    endpoint_ = models ? "/v1/models" : target;
    if (!server_.authorised(std::string(request[http::field::authorization]))) {
      throw ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)", "", "invalid_api_key",
                     "authentication_error");
    }
    if (models) {
      if (!get) throw ApiError(405, "use GET " + target, "", "method_not_allowed");
      json model = {{"id", server_.limits().model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "neva"},
                    {"max_model_len", server_.context()}};
      send_json(200, target == "/v1/models" ? json{{"object", "list"}, {"data", json::array({model})}} : model);
      return;
    }
    if (!post) throw ApiError(405, "use POST " + target, "", "method_not_allowed");
    handle_completion(request, chat);
  } catch (const ApiError& error) {
    send_error(error);
  } catch (const std::exception& error) {  // a bug of ours, not the client's: answered, the server goes on
    const std::string what = error.what();
    keep_alive_ = false;
    send_error(ApiError(500, "internal error: " + what.substr(0, what.find('\n')), "", "internal_error", "server_error"));
  }
}

void Connection::handle_completion(const http::request<http::string_body>& request, bool chat) {
  if (server_.draining()) throw ApiError(503, "the server is shutting down", "", "unavailable", "server_error");
  json body;
  try {
    body = json::parse(request.body());
  } catch (const json::exception& error) {  // also invalid UTF-8 in a string, a number beyond a double
    throw ApiError(400, std::string("the body is not valid JSON: ") + error.what(), "", "invalid_json");
  }
  serve::ParsedRequest parsed = chat ? serve::parse_chat_request(body, server_.defaults(), server_.limits())
                                     : serve::parse_completion_request(body, server_.defaults(), server_.limits());
  if (parsed.stream && request.version() < 11) {
    throw ApiError(400, "'stream': server-sent events need HTTP/1.1 (chunked transfer)", "stream");
  }
  chat_ = chat;
  stream_mode_ = parsed.stream;
  include_usage_ = parsed.include_usage;
  logprobs_ = parsed.job->top_logprobs >= 0;
  headers_sent_ = false;
  completion_ = {};
  completion_.id = random_id(chat ? "chatcmpl-" : "cmpl-");
  completion_.created = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  job_ = parsed.job;
  in_flight_ = true;
  server_.request_started();
  watch_disconnect();
  if (parsed.images.empty()) {
    submit(std::move(parsed));
    return;
  }
  // Images are decoded and preprocessed on the worker thread, then the job goes to the engine.
  auto shared = std::make_shared<serve::ParsedRequest>(std::move(parsed));
  net::post(server_.workers(), [self = shared_from_this(), shared] {
    std::optional<ApiError> failure;
    try {
      for (const auto& pending : shared->images) {
        std::string bytes = pending.bytes;
        if (!pending.path.empty()) bytes = read_limited(pending.path, self->server_.limits().max_image_bytes, pending.where);
        const Image image = decode_image(bytes, pending.where, self->server_.session().max_image_pixels());
        shared->job->images.push_back(self->server_.session().preprocess(image, pending.where));
      }
    } catch (const std::exception& error) {
      const std::string what = error.what();
      failure = ApiError(400, what.substr(0, what.find('\n')), "messages", "invalid_image");
    }
    net::post(self->stream_.get_executor(), [self, shared, failure] {
      if (self->closed_) return;
      if (failure) {
        self->send_error(*failure);
        return;
      }
      self->submit(std::move(*shared));
    });
  });
}

void Connection::submit(serve::ParsedRequest parsed) {
  if (job_->cancelled.load()) return;  // the client left while its images were decoded
  auto self = shared_from_this();
  auto executor = stream_.get_executor();
  const bool queued = server_.engine().submit(parsed.job, [self, executor](serve::JobEvent event) {
    net::post(executor, [self, event = std::move(event)]() mutable { self->on_event(std::move(event)); });
  });
  if (!queued) {
    const std::string message = server_.draining() ? "the server is shutting down"
                                                   : "the server is busy: every slot is taken and the queue is full "
                                                     "(serve.max_queue); retry later";
    send_error(ApiError(503, message, "", "overloaded", "server_error"));
  }
}

// The client hung up while its request runs: the engine drops it at its next step.
void Connection::watch_disconnect() {
  stream_.socket().async_wait(tcp::socket::wait_read, [self = shared_from_this()](beast::error_code error) {
    if (error || !self->in_flight_) return;
    char byte;
    const ssize_t got = ::recv(self->stream_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (got > 0) return;  // the next request, pipelined: read after this one
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      self->watch_disconnect();
      return;
    }
    self->job_->cancelled = true;
    self->close();
  });
}

void Connection::on_event(serve::JobEvent event) {
  if (closed_) return;
  if (!event.error.empty()) {
    if (!headers_sent_) {
      send_error(ApiError(event.status, event.error, "", event.status == 400 ? "invalid_request" : "server_error",
                          event.status == 400 ? "invalid_request_error" : "server_error"));
    } else {
      stream_event(serve::error_body(event.error, "server_error", "", ""));
      stream_raw("data: [DONE]\n\n", true);
    }
    return;
  }
  completion_.text += event.text;
  if (!stream_mode_) {
    completion_.logprobs.insert(completion_.logprobs.end(), event.logprobs.begin(), event.logprobs.end());
    if (!event.final) return;
    completion_.finish_reason = event.finish_reason;
    completion_.prompt_tokens = event.prompt_tokens;
    completion_.completion_tokens = event.completion_tokens;
    const std::string& model = server_.limits().model_name;
    send_json(200, chat_ ? serve::chat_response(completion_, model, logprobs_)
                         : serve::completion_response(completion_, model, logprobs_));
    return;
  }
  const std::string& model = server_.limits().model_name;
  const auto* logprobs = logprobs_ ? &event.logprobs : nullptr;
  if (!headers_sent_) {
    start_stream();
    if (chat_) stream_event(serve::chat_chunk(completion_, model, "", nullptr, true, ""));
  }
  if (!event.text.empty() || (logprobs && !event.logprobs.empty())) {
    stream_event(chat_ ? serve::chat_chunk(completion_, model, event.text, logprobs, false, "")
                       : serve::completion_chunk(completion_, model, event.text, logprobs, "",
                                                 completion_.text.size() - event.text.size()));
  }
  if (event.final) {
    completion_.prompt_tokens = event.prompt_tokens;
    completion_.completion_tokens = event.completion_tokens;
    stream_event(chat_ ? serve::chat_chunk(completion_, model, "", nullptr, false, event.finish_reason)
                       : serve::completion_chunk(completion_, model, "", nullptr, event.finish_reason,
                                                 completion_.text.size()));
    if (include_usage_) stream_event(serve::usage_chunk(completion_, model, chat_));
    stream_raw("data: [DONE]\n\n", true);
  }
}

void Connection::start_stream() {
  headers_sent_ = true;
  count(200);
  stream_header_ = std::make_shared<http::response<http::empty_body>>(http::status::ok, 11);
  stream_header_->set(http::field::content_type, "text/event-stream");
  stream_header_->set(http::field::cache_control, "no-cache");
  stream_header_->keep_alive(keep_alive_);
  stream_header_->chunked(true);
  stream_serializer_ = std::make_shared<http::response_serializer<http::empty_body>>(*stream_header_);
  writing_ = true;
  stream_.expires_after(std::chrono::seconds(60));
  http::async_write_header(stream_, *stream_serializer_, [self = shared_from_this()](beast::error_code error, std::size_t) {
    self->writing_ = false;
    if (error) {
      self->job_->cancelled = true;
      self->close();
      return;
    }
    self->write_next_chunk();
  });
}

void Connection::stream_event(const json& data) {
  stream_raw("data: " + data.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n", false);
}

void Connection::stream_raw(std::string payload, bool last) {
  chunks_.push_back(std::make_shared<std::string>(std::move(payload)));
  if (last) last_queued_ = true;
  if (!writing_) write_next_chunk();
}

void Connection::write_next_chunk() {
  if (closed_ || writing_) return;
  if (chunks_.empty()) {
    if (!last_queued_) return;
    last_queued_ = false;
    writing_ = true;
    stream_.expires_after(std::chrono::seconds(60));
    net::async_write(stream_, http::make_chunk_last(), [self = shared_from_this()](beast::error_code error, std::size_t) {
      self->writing_ = false;
      if (error) return self->close();
      self->finish_response();
    });
    return;
  }
  auto chunk = chunks_.front();
  chunks_.pop_front();
  writing_ = true;
  stream_.expires_after(std::chrono::seconds(60));  // a client that stops reading is dropped
  net::async_write(stream_, http::make_chunk(net::buffer(*chunk)),
                   [self = shared_from_this(), chunk](beast::error_code error, std::size_t) {
                     self->writing_ = false;
                     if (error) {
                       self->job_->cancelled = true;
                       return self->close();
                     }
                     self->write_next_chunk();
                   });
}

void Connection::send_error(const ApiError& error) {
  std::string header, value;
  if (error.status == 503 || error.status == 429) header = "Retry-After", value = "1";
  keep_alive_ = keep_alive_ && error.status < 500 && error.status != 408 && error.status != 413 && error.status != 431 &&
                error.code != "bad_http";
  send_json(error.status, serve::error_body(error.what(), error.type, error.param, error.code), header, value);
}

void Connection::send_json(int status, const json& body, const std::string& extra_header, const std::string& extra_value) {
  auto response = std::make_shared<http::response<http::string_body>>(static_cast<http::status>(status), 11);
  response->set(http::field::content_type, "application/json");
  if (!extra_header.empty()) response->set(extra_header, extra_value);
  // Text the model wrote may cut a UTF-8 character only at the very end of a length-limited answer;
  // such bytes are replaced rather than failing the response.
  response->body() = body.dump(-1, ' ', false, json::error_handler_t::replace);
  count(status);
  send(response);
}

void Connection::send(std::shared_ptr<http::response<http::string_body>> response) {
  response->keep_alive(keep_alive_);
  response->prepare_payload();
  stream_.expires_after(std::chrono::seconds(60));
  http::async_write(stream_, *response, [self = shared_from_this(), response](beast::error_code error, std::size_t) {
    if (error) return self->close();
    self->finish_response();
  });
}

// A request's answer has left (or its client has): a draining server may stop once none is left.
void Connection::end_in_flight() {
  if (!in_flight_) return;
  in_flight_ = false;
  server_.request_finished();
}

void Connection::finish_response() {
  end_in_flight();
  stream_.expires_never();
  if (linger_) return linger();
  if (!keep_alive_ || server_.draining()) return close();
  beast::error_code ignored;
  stream_.socket().cancel(ignored);  // the disconnect watch
  read_request();
}

// After refusing a body still on its way: stop sending, read and drop what arrives (up to 2 s), then
// close, so the client reads the answer instead of a reset (a "lingering close", as nginx does).
void Connection::linger() {
  linger_ = false;
  beast::error_code ignored;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
  stream_.expires_after(std::chrono::seconds(2));
  drain_input(std::make_shared<std::array<char, 65536>>());
}

void Connection::drain_input(std::shared_ptr<std::array<char, 65536>> discard) {
  stream_.async_read_some(net::buffer(*discard), [self = shared_from_this(), discard](beast::error_code error, std::size_t) {
    if (error) return self->close();  // the client's end of the body, or 2 s
    self->drain_input(discard);
  });
}

void Connection::close() {
  if (closed_) return;
  closed_ = true;
  if (job_) job_->cancelled = true;
  end_in_flight();
  read_timer_.cancel();
  beast::error_code ignored;
  stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
  stream_.socket().close(ignored);
}

void Connection::count(int status) {
  server_.metrics().requests.Add({{"endpoint", endpoint_}, {"status", std::to_string(status)}}).Increment();
}

}  // namespace

int run_serve(const Recipe& recipe, const ServeOptions& options) {
  if (World::launched_size() != 1) {
    throw RecipeError(recipe.source + ": neva-run serve runs as one process (tensor- and pipeline-parallel serving "
                                      "is not implemented); launch it without torchrun or --nproc-per-node");
  }
  Session session(recipe);
  const PluginInfo& backbone = recipe.registry->find(LanguageBackbone::kKind, recipe.model.mm_cfg.llm->plugin);
  if (backbone.abi.minor < 5) {
    throw RecipeError(recipe.source + ": the language backbone plugin '" + backbone.name + "' (" + backbone.path.string() +
                      ") was built for plugin ABI " + std::to_string(backbone.abi.major) + "." +
                      std::to_string(backbone.abi.minor) + "; serving needs 2.5 (KV-cache slots): rebuild it");
  }
  Server server(session, recipe, options);
  return server.run();
}

}  // namespace neva
