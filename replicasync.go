package redlatch

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// waitMargin is how much shorter than the connection's read timeout the
// WAIT timeout must be for the script and WAIT to share one pipelined round
// trip; else they are sent one after the other on one pinned connection.
const waitMargin = 100 * time.Millisecond

// runSynced runs script s with keys and args on the master holding keys[0]
// and, when the Client was made WithReplicaSync(replicas, timeout), follows
// it on the same connection with WAIT replicas timeout — in the same
// pipeline, so in one round trip, whenever the WAIT timeout fits within the
// connection's read timeout.
//
// It returns the script's command (its reply, or its error: a reply error of
// the script, or a network or context error after which the script's effect
// is unknown) and, when the script ran, the number of replicas that
// acknowledged its writes, or the error of WAIT. acked is -1 when replica
// sync is off: then runSynced is s.Run.
//
// An empty script cache (NOSCRIPT) is handled as by Script.Run: the
// pipeline is sent again with EVAL, which also caches the script. On a
// cluster, the pipeline goes straight to the master of keys[0]'s slot (WAIT
// must run on the connection that wrote); a MOVED or ASK reply reloads the
// slot map and the pipeline is sent once more.
func (c *Client) runSynced(ctx context.Context, s *redis.Script, keys []string, args ...any) (cmd *redis.Cmd, acked int64, waitErr error) {
	if c.opts.replicas <= 0 {
		return s.Run(ctx, c.rdb, keys, args...), -1, nil
	}
	for attempt := 0; ; attempt++ {
		node, err := c.masterFor(ctx, keys[0])
		if err != nil {
			cmd = redis.NewCmd(ctx)
			cmd.SetErr(err)
			return cmd, 0, nil
		}
		cmd, acked, waitErr = c.runOnWithWait(ctx, node, s, keys, args)
		if c.cluster != nil && attempt == 0 && isRedirect(cmd.Err()) {
			c.cluster.ReloadState(ctx)
			continue
		}
		return cmd, acked, waitErr
	}
}

// masterFor returns the node client that must run a script on key: the
// Client's own Redis client, or on a cluster the master of key's slot.
func (c *Client) masterFor(ctx context.Context, key string) (*redis.Client, error) {
	if c.cluster != nil {
		return c.cluster.MasterForKey(ctx, key)
	}
	if rc, ok := c.rdb.(*redis.Client); ok {
		return rc, nil
	}
	return nil, fmt.Errorf("redlatch: replica sync needs a *redis.Client or *redis.ClusterClient, not %T", c.rdb)
}

// runOnWithWait sends the script and WAIT on one connection of node.
func (c *Client) runOnWithWait(ctx context.Context, node *redis.Client, s *redis.Script, keys []string, args []any) (*redis.Cmd, int64, error) {
	n, timeout := c.opts.replicas, c.opts.replicaTimeout
	ms := max(timeout.Milliseconds(), 1) // WAIT n 0 would block for good
	if rt := node.Options().ReadTimeout; rt < 0 || timeout+waitMargin < rt {
		// One round trip: EVALSHA and WAIT pipelined.
		send := func(sha bool) (*redis.Cmd, *redis.Cmd) {
			pipe := node.Pipeline()
			var cmd *redis.Cmd
			if sha {
				cmd = s.EvalSha(ctx, pipe, keys, args...)
			} else {
				cmd = s.Eval(ctx, pipe, keys, args...)
			}
			wait := pipe.Do(ctx, "WAIT", n, ms)
			_, _ = pipe.Exec(ctx)
			return cmd, wait
		}
		cmd, wait := send(true)
		if isNoScript(cmd.Err()) {
			cmd, wait = send(false)
		}
		if cmd.Err() != nil {
			return cmd, 0, nil
		}
		acked, err := wait.Int64()
		return cmd, acked, err
	}
	// WAIT may outlast the read timeout of a pipeline: two round trips on a
	// pinned connection, WAIT with its own read timeout.
	conn := node.Conn()
	defer conn.Close()
	cmd := s.Run(ctx, conn, keys, args...)
	if cmd.Err() != nil {
		return cmd, 0, nil
	}
	acked, err := conn.Wait(ctx, n, time.Duration(ms)*time.Millisecond).Result()
	return cmd, acked, err
}

// replicated checks what runSynced reported for an acquisition that took
// something: with replica sync off, or enough replicas acknowledging, it
// returns nil. Else it releases what the acquisition took, with undo and a
// fresh bounded context (so that no hold remains that no replica has), and
// returns an error wrapping ErrNotReplicated that says how many replicas
// acknowledged, or why WAIT failed.
//
// It is the helper every primitive's acquisition uses:
//
//	cmd, acked, waitErr := c.runSynced(ctx, script, keys, args...)
//	// ... parse cmd; if the script took something:
//	if err := c.replicated(ctx, acked, waitErr, undo); err != nil { ... }
//
// The error is not a Redis reply error, and the acquire loop (see
// Client.failedAttempt) does not undo an ErrNotReplicated attempt again.
func (c *Client) replicated(ctx context.Context, acked int64, waitErr error, undo func(context.Context)) error {
	if c.opts.replicas <= 0 || (waitErr == nil && acked >= int64(c.opts.replicas)) {
		return nil
	}
	done := ""
	if undo != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		undo(cctx)
		cancel()
		done = ", released"
	}
	if waitErr != nil {
		return fmt.Errorf("%w: WAIT %d %v failed%s: %w", ErrNotReplicated,
			c.opts.replicas, c.opts.replicaTimeout, done, waitErr)
	}
	return fmt.Errorf("%w: %d of %d replicas acknowledged within %v%s", ErrNotReplicated,
		acked, c.opts.replicas, c.opts.replicaTimeout, done)
}

// isRedirect reports whether err is a cluster MOVED or ASK reply.
func isRedirect(err error) bool {
	var re redis.Error
	if err == nil || !errors.As(err, &re) {
		return false
	}
	msg := err.Error()
	return strings.HasPrefix(msg, "MOVED ") || strings.HasPrefix(msg, "ASK ")
}

// runBatchesSynced is the watchdog's renewal under WithReplicaSync: each
// batch runs with runSynced (script and WAIT in one round trip, on the
// master of the batch's slot), the batches concurrently. A batch whose
// renewal too few replicas acknowledged counts as a failed renewal for the
// holds it renewed: their results become -1 (not renewed, not lost), so
// their local deadlines are not extended. If replication does not recover
// before a deadline, the hold is lost (Lost closes) at the moment a replica
// promoted then could have let its copy of the lock expire. Holds the
// renewal found gone (0) are lost at once as usual.
func (w *watchdog) runBatchesSynced(ctx context.Context, batches [][]*hold) [][]int64 {
	out := make([][]int64, len(batches))
	var wg sync.WaitGroup
	for i, b := range batches {
		wg.Add(1)
		go func() {
			defer wg.Done()
			keys := make([]string, len(b))
			argv := make([]any, 0, 3*len(b))
			for j, h := range b {
				keys[j] = h.key
				argv = append(argv, string(h.kind), h.member, h.lease.Milliseconds())
			}
			cmd, acked, waitErr := w.c.runSynced(ctx, renewScript, keys, argv...)
			res, err := cmd.Int64Slice()
			if err != nil {
				w.c.opts.logger.Warn("redlatch: renewal failed", "error", err)
				return
			}
			if err := w.c.replicated(ctx, acked, waitErr, nil); err != nil {
				w.c.opts.logger.Warn("redlatch: renewal not replicated", "error", err)
				for j := range res {
					if res[j] == 1 {
						res[j] = -1
					}
				}
			}
			out[i] = res
		}()
	}
	wg.Wait()
	return out
}
