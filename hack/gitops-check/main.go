// Command gitops-check reads Kubernetes objects as GitOps tools do, so that
// Palisade's tests can check its status against the real implementations:
//
//	gitops-check kstatus < object.json
//	    prints the status Flux's kstatus (sigs.k8s.io/cli-utils) computes:
//	    {"status":"Current|InProgress|Failed|...","message":"..."}
//	gitops-check argocd-health health.lua < object.json
//	    runs an Argo CD resource health script in gopher-lua (the Lua
//	    runtime Argo CD embeds), with the object bound to `obj`, and prints
//	    {"status":"Healthy|Progressing|Degraded|...","message":"..."}
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "gitops-check:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: gitops-check kstatus | argocd-health FILE.lua (object JSON on stdin)")
	}
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	var obj map[string]interface{}
	// Kubernetes' decoder keeps integers as int64, as unstructured expects.
	if err := utiljson.Unmarshal(raw, &obj); err != nil {
		return fmt.Errorf("object on stdin: %w", err)
	}
	var res result
	switch args[0] {
	case "kstatus":
		r, err := status.Compute(&unstructured.Unstructured{Object: obj})
		if err != nil {
			return err
		}
		res = result{Status: r.Status.String(), Message: r.Message}
	case "argocd-health":
		if len(args) != 2 {
			return fmt.Errorf("argocd-health needs the script path")
		}
		res, err = argoHealth(args[1], obj)
		if err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown mode %q", args[0])
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func argoHealth(script string, obj map[string]interface{}) (result, error) {
	L := lua.NewState()
	defer L.Close()
	L.SetGlobal("obj", toLua(L, obj))
	// Argo CD evaluates the script as a chunk whose return value is the
	// health table.
	fn, err := L.LoadFile(script)
	if err != nil {
		return result{}, err
	}
	L.Push(fn)
	if err := L.PCall(0, 1, nil); err != nil {
		return result{}, err
	}
	ret, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		return result{}, fmt.Errorf("script returned %s, not a table", L.Get(-1).Type())
	}
	return result{Status: lua.LVAsString(ret.RawGetString("status")), Message: lua.LVAsString(ret.RawGetString("message"))}, nil
}

func toLua(L *lua.LState, v interface{}) lua.LValue {
	switch x := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(x)
	case float64:
		return lua.LNumber(x)
	case int64:
		return lua.LNumber(x)
	case string:
		return lua.LString(x)
	case []interface{}:
		t := L.NewTable()
		for _, e := range x {
			t.Append(toLua(L, e))
		}
		return t
	case map[string]interface{}:
		t := L.NewTable()
		for k, e := range x {
			t.RawSetString(k, toLua(L, e))
		}
		return t
	default:
		return lua.LString(fmt.Sprint(x))
	}
}
