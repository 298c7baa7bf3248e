package redlatch

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"weak"

	"github.com/redis/go-redis/v9"
)

// go-redis sets the deadline of each read from the client's ReadTimeout (3s
// by default), and from the call's ctx only when ContextTimeoutEnabled is on,
// which it is not by default. Without it, a Lock whose ctx ends while Redis
// does not answer (a frozen server, a link that drops packets) would return
// only after the ReadTimeout, and the undo of its unanswered attempt, which
// has a fresh bounded ctx, after another one: 10s for a 300ms ctx.
//
// So on a *redis.Client with the option off (a sentinel failover client
// too) New installs a deadlineHook, which sends redlatch's script calls and
// reads through a clone of the client with the option on. The clone is a
// WithTimeout clone with the client's own timeouts: it shares the client's
// connection pool (its connections, limits and dial hooks), and its options
// are its own copy. go-redis runs the hooks added later closer to the
// server: the hooks the user added before New (tracing, metrics) see every
// call as before, and the hooks added after New do not see the routed
// ones, which go round them. Only redlatch's calls are routed (EVALSHA,
// EVAL or SCRIPT LOAD of a script made with newScript, alone or first in a
// pipeline; and its other calls, marked by own): the user's
// commands are the client's business. A *redis.ClusterClient gets no hook:
// set ContextTimeoutEnabled in its options (New logs a warning when it is
// off).

// scripts are the SHA1 digests and the sources of every script made with
// newScript: the calls deadlineHook routes.
var scripts = make(map[string]struct{})

// newScript is redis.NewScript for redlatch's own scripts (see scripts).
func newScript(src string) *redis.Script {
	s := redis.NewScript(src)
	scripts[s.Hash()] = struct{}{}
	scripts[src] = struct{}{}
	return s
}

// isScriptCall reports whether cmd runs one of redlatch's scripts, or
// loads it (the watchdog's SCRIPT LOAD after NOSCRIPT).
func isScriptCall(cmd redis.Cmder) bool {
	args := cmd.Args()
	if len(args) < 2 {
		return false
	}
	switch name, _ := args[0].(string); name {
	case "evalsha", "eval":
	case "script":
		if len(args) < 3 || args[1] != "load" {
			return false
		}
		args = args[1:]
	default:
		return false
	}
	s, _ := args[1].(string)
	_, ok := scripts[s]
	return ok
}

// deadlineHook routes redlatch's script calls on a *redis.Client with
// ContextTimeoutEnabled off through clone, which has it on (see above).
// A go-redis client keeps its hooks for good: it gets one deadlineHook,
// installed by the first Client on it.
type deadlineHook struct {
	clone *redis.Client
}

// routed marks the ctx of a call that is not to be routed (again): one
// routed through the clone already (should the clone ever carry the hook
// too, a go-redis that copies hooks to a clone made after them), and the
// calls on a pinned connection (see pinned).
type routed struct{}

// ownCall marks the ctx of redlatch's own calls that are not scripts: its
// reads, a MULTI of read commands (see Client.onMaster), and the PUBLISH of
// a release its script could not announce: deadlineHook routes them too.
type ownCall struct{}

// own returns ctx for redlatch's own calls that are not scripts (see
// ownCall).
func own(ctx context.Context) context.Context {
	return context.WithValue(ctx, ownCall{}, true)
}

// isOwnTx reports whether cmds are the transaction of one of redlatch's
// reads: MULTI, the reads, EXEC, sent with a ctx from own.
func isOwnTx(ctx context.Context, cmds []redis.Cmder) bool {
	return len(cmds) > 2 && ctx.Value(ownCall{}) != nil &&
		cmds[0].Name() == "multi" && cmds[len(cmds)-1].Name() == "exec"
}

// pinned returns ctx for the calls on a connection redlatch pinned
// (redis.Client.Conn, with the client's hooks and options): they are not
// routed, for a WAIT must follow on the connection that wrote, and the
// clone would send a script on one of its own. Their reads keep the
// client's ReadTimeout. (A pinned connection of the clone would end them
// with their ctx, but the hooks the user added would not see its calls:
// every renewal under WithReplicaSync with a sync timeout above the
// ReadTimeout.)
func pinned(ctx context.Context) context.Context {
	return context.WithValue(ctx, routed{}, true)
}

// deadlineHooks holds each go-redis client with a deadlineHook (weakly: a
// go-redis client dropped by its user is not kept). Its values hold
// nothing: the hook's clone shares its client's internals, and a value
// kept here would keep the client for good.
var deadlineHooks sync.Map // weak.Pointer[redis.Client] → struct{}

// hookOnce stores v for rdb in m, a map of go-redis clients to their hook
// (or what it needs), unless m has a value for rdb already, and returns the
// value m holds and whether this call stored it: the caller then adds its
// hook to rdb. A go-redis client keeps its hooks for good, so it gets one
// of each kind, shared by its Clients. m is keyed weakly, and its entry
// goes when rdb is collected: an application that opens and drops clients
// does not grow it.
func hookOnce(m *sync.Map, rdb *redis.Client, v any) (any, bool) {
	key := weak.Make(rdb)
	held, loaded := m.LoadOrStore(key, v)
	if !loaded {
		runtime.AddCleanup(rdb, func(key weak.Pointer[redis.Client]) { m.Delete(key) }, key)
	}
	return held, !loaded
}

// honourDeadlines installs the deadlineHook of rdb when rdb is a
// *redis.Client with ContextTimeoutEnabled off, and reports whether the
// deadlines of redlatch's calls on rdb reach its reads: false only for a
// *redis.ClusterClient with the option off.
func honourDeadlines(rdb redis.UniversalClient) bool {
	switch r := rdb.(type) {
	case *redis.ClusterClient:
		return r.Options().ContextTimeoutEnabled
	case *redis.Client:
		o := r.Options()
		if o.ContextTimeoutEnabled {
			return true
		}
		if o.ReadTimeout < 0 {
			// A ReadTimeout of -2 (go-redis stores it as -1) disables read
			// deadlines, ctx's too: the user's choice, for connections
			// that take none. Left alone.
			return true
		}
		if _, first := hookOnce(&deadlineHooks, r, struct{}{}); !first {
			return true
		}
		clone := r.WithTimeout(o.ReadTimeout) // sets both timeouts to it
		co := clone.Options()                 // the clone's own copy
		co.WriteTimeout = o.WriteTimeout
		co.ContextTimeoutEnabled = true
		r.AddHook(&deadlineHook{clone: clone})
	}
	return true
}

func (h *deadlineHook) DialHook(next redis.DialHook) redis.DialHook { return next }

// ProcessHook routes a command that runs one of redlatch's scripts, or
// that redlatch marked as its own (see own).
func (h *deadlineHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !isScriptCall(cmd) && ctx.Value(ownCall{}) == nil || ctx.Value(routed{}) != nil {
			return next(ctx, cmd)
		}
		return h.clone.Process(context.WithValue(ctx, routed{}, true), cmd)
	}
}

// ProcessPipelineHook routes a pipeline whose first command is one of
// redlatch's scripts (a renewal, a script and its WAIT): a user's pipeline
// never starts so, nor a transaction (MULTI comes first); and the
// transaction of one of redlatch's reads (see routeTx).
func (h *deadlineHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if len(cmds) == 0 || ctx.Value(routed{}) != nil {
			return next(ctx, cmds)
		}
		if isOwnTx(ctx, cmds) {
			return h.routeTx(ctx, cmds)
		}
		if !isScriptCall(cmds[0]) {
			return next(ctx, cmds)
		}
		// The error next would return: go-redis's pipeline returns the
		// first failed command's, a reply error (NOSCRIPT, ...) too.
		return send(ctx, h.clone.Pipeline(), cmds)
	}
}

// send queues cmds on pipe, a pipeline of the clone, and runs it with ctx
// marked routed; the pipeline sets each command's reply.
func send(ctx context.Context, pipe redis.Pipeliner, cmds []redis.Cmder) error {
	ctx = context.WithValue(ctx, routed{}, true)
	for _, cmd := range cmds {
		_ = pipe.Process(ctx, cmd) // queued
	}
	_, err := pipe.Exec(ctx)
	return err
}

// routeTx sends the transaction of one of redlatch's reads (MULTI, the
// reads, EXEC: see isOwnTx) through the clone, which wraps the reads in a
// MULTI and EXEC of its own. The caller's MULTI and EXEC get the error of
// a transaction that did not go through, as go-redis sets it.
func (h *deadlineHook) routeTx(ctx context.Context, cmds []redis.Cmder) error {
	err := send(ctx, h.clone.TxPipeline(), cmds[1:len(cmds)-1])
	var reply redis.Error // a command's reply (redis.Nil too): not theirs
	if err != nil && !errors.As(err, &reply) {
		cmds[0].SetErr(err)
		cmds[len(cmds)-1].SetErr(err)
	}
	return err
}
