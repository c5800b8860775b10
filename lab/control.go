package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"tailscale.com/tstest/integration"
	"tailscale.com/tstest/integration/testcontrol"
)

// magicDNSDomain is the suffix of every node's MagicDNS name (devhost.tailbox-lab.test).
const magicDNSDomain = "tailbox-lab.test"

// controlInfo is the line `control` prints once every listener is bound.
type controlInfo struct {
	ControlURL string `json:"control_url"`
	DERPURL    string `json:"derp_url"`
	STUNAddr   string `json:"stun_addr"`
	// TrapURL is an HTTP proxy that refuses everything and counts attempts. Lab nodes get it as
	// HTTP(S)_PROXY, so any stray attempt to reach the internet over HTTP lands here instead.
	TrapURL string `json:"trap_url"`
	// AuthKeyRequired says whether registration needs the key from --auth-key-file.
	AuthKeyRequired bool `json:"auth_key_required"`
	// MagicDNSSuffix is the domain of every node's MagicDNS name.
	MagicDNSSuffix string `json:"magic_dns_suffix"`
}

func runControl(args []string) error {
	fs := flag.NewFlagSet("control", flag.ExitOnError)
	keyFile := fs.String("auth-key-file", "", "file holding the auth key every node must register with; empty lets any node register (the key is read from a file so it never shows up in argv)")
	listen := fs.String("listen", "127.0.0.1:0", "address for the control server")
	verbose := fs.Bool("verbose", false, "log every control request body")
	fs.Parse(args)

	var authKey string
	if *keyFile != "" {
		b, err := os.ReadFile(*keyFile)
		if err != nil {
			return fmt.Errorf("reading auth key: %w", err)
		}
		authKey = strings.TrimSpace(string(b))
		if authKey == "" {
			return errors.New("auth key file is empty")
		}
	}

	tb := &labTB{}
	defer tb.runCleanups()

	// Tailscale's own integration tests use this exact pair: a DERP server over self-signed TLS
	// (the map marks it InsecureForTests) and a STUN server, both on loopback.
	derpMap := integration.RunDERPAndSTUN(tb, log.Printf, "127.0.0.1")
	derpNode := derpMap.Regions[1].Nodes[0]

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("control listen: %w", err)
	}
	controlURL := "http://" + ln.Addr().String()
	control := &testcontrol.Server{
		DERPMap:         derpMap,
		ExplicitBaseURL: controlURL,
		RequireAuthKey:  authKey,
		// Without this peers are reported offline, which skips the fast disco paths real
		// control would take.
		AllOnline: true,
		// Nodes get FQDNs (devhost.tailbox-lab.test) as on a real tailnet, so names resolve
		// from the netmap the way MagicDNS names do. A reserved TLD: nothing leaves the lab.
		MagicDNSDomain: magicDNSDomain,
		Verbose:        *verbose,
	}
	go serveOrDie("control", ln, onlyControlPaths(control))

	trapLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("trap listen: %w", err)
	}
	trap := &trapHandler{}
	go serveOrDie("trap", trapLn, trap)

	if err := announce(controlInfo{
		ControlURL:      controlURL,
		DERPURL:         fmt.Sprintf("https://%s", net.JoinHostPort(derpNode.IPv4, fmt.Sprint(derpNode.DERPPort))),
		STUNAddr:        net.JoinHostPort(derpNode.IPv4, fmt.Sprint(derpNode.STUNPort)),
		TrapURL:         "http://" + trapLn.Addr().String(),
		AuthKeyRequired: authKey != "",
		MagicDNSSuffix:  magicDNSDomain,
	}); err != nil {
		return err
	}
	log.Printf("control serving at %s (auth key required: %v)", controlURL, authKey != "")

	why := waitForShutdown()
	log.Printf("control shutting down: %s; egress attempts trapped: %d", why, trap.hits.Load())
	_ = ln.Close()
	_ = trapLn.Close()
	return nil
}

// onlyControlPaths forwards the paths testcontrol serves and answers 404 for anything else.
// testcontrol panics the whole process on an unknown path, which would turn a stray browser
// request into a dead lab.
func onlyControlPaths(control http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		switch {
		case p == "/generate_204", p == "/key", p == "/ts2021",
			strings.HasPrefix(p, "/machine/"), strings.HasPrefix(p, "/c2n/"):
			control.ServeHTTP(w, r)
		case p == "/healthz":
			fmt.Fprintln(w, "ok")
		default:
			http.NotFound(w, r)
		}
	})
}

// trapHandler is the proxy lab nodes are told to use. It refuses every proxied request; plain
// GET /hits reports how many it has refused, so a test can assert that nothing tried to leave.
type trapHandler struct {
	hits atomic.Int64
}

func (t *trapHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect || r.URL.IsAbs() {
		n := t.hits.Add(1)
		log.Printf("TRAP: refused egress attempt #%d: %s %s", n, r.Method, r.RequestURI)
		http.Error(w, "tailbox lab: internet access is not allowed", http.StatusForbidden)
		return
	}
	if r.URL.Path == "/hits" {
		fmt.Fprintf(w, "%d\n", t.hits.Load())
		return
	}
	http.NotFound(w, r)
}

// labTB satisfies testing.TB for the integration helpers, which are written for tests. The
// embedded nil TB only supplies the interface's unexported method; every method the helpers
// call is defined here. A fatal error ends the process, which the parent sees as the child
// exiting before it printed its JSON line.
type labTB struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
}

func (t *labTB) Helper()                           {}
func (t *labTB) Name() string                      { return "tailbox-lab" }
func (t *labTB) Failed() bool                      { return false }
func (t *labTB) Context() context.Context          { return context.Background() }
func (t *labTB) Log(args ...any)                   { log.Print(args...) }
func (t *labTB) Logf(format string, args ...any)   { log.Printf(format, args...) }
func (t *labTB) Error(args ...any)                 { log.Fatal(args...) }
func (t *labTB) Errorf(format string, args ...any) { log.Fatalf(format, args...) }
func (t *labTB) Fatal(args ...any)                 { log.Fatal(args...) }
func (t *labTB) Fatalf(format string, args ...any) { log.Fatalf(format, args...) }
func (t *labTB) Fail()                             { log.Fatal("failed") }
func (t *labTB) FailNow()                          { log.Fatal("failed") }

func (t *labTB) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}

func (t *labTB) runCleanups() {
	t.mu.Lock()
	fns := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
}
