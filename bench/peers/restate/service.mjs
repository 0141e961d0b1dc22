// The Restate peer of `cargo xtask bench-peers`: the same two entities as
// examples/counter and examples/team-joiner, as Restate virtual objects served
// by the TypeScript SDK over HTTP/2 on 127.0.0.1:$PORT.
//
// counter/<key>/add  (exclusive) adds the JSON integer and returns the new total
// counter/<key>/get  (shared)    returns the total
// user/<key>/join    (exclusive) puts the user on a team; refuses a second team
// user/<key>/team    (shared)    returns the team or null
import * as http2 from "node:http2";
import * as restate from "@restatedev/restate-sdk";

const counter = restate.object({
  name: "counter",
  handlers: {
    add: async (ctx, n) => {
      const total = ((await ctx.get("total")) ?? 0) + n;
      ctx.set("total", total);
      return total;
    },
    get: restate.handlers.object.shared(async (ctx) => (await ctx.get("total")) ?? 0),
  },
});

const user = restate.object({
  name: "user",
  handlers: {
    join: async (ctx, team) => {
      const current = await ctx.get("team");
      if (current != null && current !== team) {
        throw new restate.TerminalError(`user ${ctx.key} is already on team ${current}`, { errorCode: 409 });
      }
      if (current == null) ctx.set("team", team);
      return team;
    },
    team: restate.handlers.object.shared(async (ctx) => (await ctx.get("team")) ?? null),
  },
});

const port = Number(process.env.PORT ?? 9080);
const server = http2.createServer(restate.createEndpointHandler({ services: [counter, user] }));
server.listen(port, "127.0.0.1", () => console.log(`restate service listening on 127.0.0.1:${port}`));
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => process.exit(0));
