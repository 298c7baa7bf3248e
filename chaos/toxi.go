package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/toxics"
	"github.com/rs/zerolog"
)

// Proxy is a toxiproxy proxy embedded in the test process (the library, not
// the toxiproxy-server binary) between clients and one Redis server.
type Proxy struct {
	Addr string // where clients connect
	p    *toxiproxy.Proxy
}

var proxySeq atomic.Int64

// NewProxy starts a proxy on a free port of 127.0.0.1 to upstream.
func NewProxy(upstream string) (*Proxy, error) {
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	p := toxiproxy.NewProxy(srv, fmt.Sprintf("redis-%d", proxySeq.Add(1)), "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		return nil, err
	}
	return &Proxy{Addr: p.Listen, p: p}, nil
}

// AddToxic adds a toxic: typ is a toxiproxy toxic type ("latency",
// "timeout", "reset_peer", "limit_data", or DropReplies), stream is
// "upstream" (client to Redis) or "downstream" (Redis to client).
func (p *Proxy) AddToxic(name, typ, stream string, attrs map[string]any) error {
	b, err := json.Marshal(map[string]any{
		"name": name, "type": typ, "stream": stream, "toxicity": 1.0, "attributes": attrs,
	})
	if err != nil {
		return err
	}
	_, err = p.p.Toxics.AddToxicJson(bytes.NewReader(b))
	return err
}

// RemoveToxic removes a toxic added by AddToxic.
func (p *Proxy) RemoveToxic(name string) error {
	return p.p.Toxics.RemoveToxic(context.Background(), name)
}

// Close stops the proxy and closes its connections.
func (p *Proxy) Close() { p.p.Stop() }

// DropReplies is a toxic type of this package: on the downstream, it drops
// the next replies from Redis, counted by DropBudget over every connection,
// and closes each connection that carried one. The server has run the
// command whose reply is dropped: the client cannot tell whether it did.
const DropReplies = "chaos_drop_replies"

// DropBudget is how many more replies DropReplies drops.
var DropBudget atomic.Int64

type dropReplies struct{}

func (dropReplies) Pipe(stub *toxics.ToxicStub) {
	for {
		select {
		case <-stub.Interrupt:
			return
		case c := <-stub.Input:
			if c == nil {
				stub.Close()
				return
			}
			if takeDrop() {
				stub.Close()
				return
			}
			stub.Output <- c
		}
	}
}

// takeDrop takes one reply from DropBudget, if any is left.
func takeDrop() bool {
	for {
		n := DropBudget.Load()
		if n <= 0 {
			return false
		}
		if DropBudget.CompareAndSwap(n, n-1) {
			return true
		}
	}
}

func init() { toxics.Register(DropReplies, new(dropReplies)) }
