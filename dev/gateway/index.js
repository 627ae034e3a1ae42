// Dev-only gateway. `wrangler dev` with several configs serves only its first worker, so this
// worker is first and forwards to the real two through service bindings:
//   /consumer/...   -> vm-consumer-worker, prefix stripped
//   everything else -> vm-api-worker
// Its cron handler fires the consumer worker's, so `--test-scheduled` and GET /__scheduled
// run the real lease sweep locally.
const PREFIX = "/consumer";

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    if (url.pathname === PREFIX || url.pathname.startsWith(PREFIX + "/")) {
      url.pathname = url.pathname.slice(PREFIX.length) || "/";
      return env.CONSUMER.fetch(new Request(url, request));
    }
    return env.API.fetch(request);
  },

  async scheduled(event, env) {
    await env.CONSUMER.scheduled({ cron: event.cron, scheduledTime: event.scheduledTime });
  },
};
