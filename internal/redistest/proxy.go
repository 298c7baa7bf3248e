package redistest

import (
	"io"
	"net"
	"sync"
	"testing"
)

// Proxy is a TCP proxy on a free 127.0.0.1 port in front of a Redis
// server, for faults toxiproxy would need a module for: Freeze makes every
// connection open at that moment silent in both directions, for good, the
// way a connection to a host that died (or a half-open connection) looks
// from the client: writes succeed, nothing ever comes back, and no error
// is seen until TCP gives up, minutes later. Connections made after Freeze
// work normally. Hold keeps what clients send on the connections open at
// that moment from reaching Redis until Release: a request stuck in a slow
// link, which arrives after its client gave up.
//
// A Proxy is closed, with all its connections, in t.Cleanup.
type Proxy struct {
	// Addr is "127.0.0.1:port", the address clients dial.
	Addr string

	target string
	ln     net.Listener

	mu    sync.Mutex
	conns map[*proxyConn]struct{}
	wg    sync.WaitGroup
}

type proxyConn struct {
	client, server net.Conn

	mu      sync.Mutex
	frozen  bool
	held    bool
	pending []byte        // bytes from the client kept by Hold
	release chan struct{} // closed by Release
}

// NewProxy starts a proxy to target (host:port).
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("redistest: proxy listen: %v", err)
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, conns: make(map[*proxyConn]struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		pc := &proxyConn{client: c, server: s}
		p.mu.Lock()
		p.conns[pc] = struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(pc, s, c)
		go p.pipe(pc, c, s)
	}
}

// pipe copies from src to dst, dropping the bytes once pc is frozen.
func (p *Proxy) pipe(pc *proxyConn, dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			pc.mu.Lock()
			frozen := pc.frozen
			held := pc.held && dst == pc.server
			if held {
				pc.pending = append(pc.pending, buf[:n]...)
			}
			pc.mu.Unlock()
			if !frozen && !held {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					err = werr
				}
			}
		}
		if err != nil {
			pc.mu.Lock()
			frozen := pc.frozen
			var release chan struct{}
			if pc.held && dst == pc.server {
				release = pc.release
			}
			pc.mu.Unlock()
			if frozen {
				return // silent to the end: no FIN, no RST; Close closes it
			}
			if release != nil {
				// The client is gone, but what it sent still goes to Redis
				// at Release; the server side stays open until Close.
				<-release
				return
			}
			if err != io.EOF {
				_ = src.Close()
			}
			_ = dst.Close()
			p.mu.Lock()
			delete(p.conns, pc)
			p.mu.Unlock()
			return
		}
	}
}

// Freeze silences every connection open now, in both directions, for good.
// It returns how many connections it froze.
func (p *Proxy) Freeze() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pc := range p.conns {
		pc.mu.Lock()
		pc.frozen = true
		pc.mu.Unlock()
	}
	return len(p.conns)
}

// Hold keeps what the clients of every connection open now send from
// reaching Redis, until Release; replies still flow. It returns how many
// connections it holds.
func (p *Proxy) Hold() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pc := range p.conns {
		pc.mu.Lock()
		pc.held, pc.release = true, make(chan struct{})
		pc.mu.Unlock()
	}
	return len(p.conns)
}

// Release sends what Hold kept on to Redis, and forwards again.
func (p *Proxy) Release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pc := range p.conns {
		pc.mu.Lock()
		if pc.held {
			_, _ = pc.server.Write(pc.pending)
			pc.held, pc.pending = false, nil
			close(pc.release)
		}
		pc.mu.Unlock()
	}
}

// Close stops the proxy and closes every connection.
func (p *Proxy) Close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for pc := range p.conns {
		_ = pc.client.Close()
		_ = pc.server.Close()
		pc.mu.Lock()
		if pc.held {
			pc.held = false
			close(pc.release)
		}
		pc.mu.Unlock()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
