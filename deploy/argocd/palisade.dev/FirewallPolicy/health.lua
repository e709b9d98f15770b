-- Argo CD health check for palisade.dev/FirewallPolicy.
-- Reads the status the Palisade controller writes (kstatus polarity):
--   Stalled=True             -> Degraded  (stuck until the policy or AWS changes)
--   not yet observed         -> Progressing
--   Ready=True               -> Healthy
--   otherwise (Reconciling)  -> Progressing
local hs = { status = "Progressing", message = "Waiting for the Palisade controller" }
if obj.status == nil then
  return hs
end

local function condition(kind)
  if obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.message or stalled.reason or "Stalled"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= nil and obj.status.observedGeneration ~= generation then
  hs.message = "Waiting for the controller to observe generation " .. tostring(generation)
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Applied on both layers"
  return hs
end

local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = reconciling.message or reconciling.reason or "Reconciling"
elseif ready ~= nil then
  hs.message = ready.message or ready.reason or "Not ready"
end
return hs
